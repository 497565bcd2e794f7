"""Checkpoints and resume on torch >= 2.6 with ``weights_only=True`` (issue 7).

mmengine 0.10.7 saves numpy values and ``HistoryBuffer`` objects next to the weights and
loads with the torch default ``weights_only=True``, so without ``nat_mm`` its own
checkpoints do not load. ``import nat_mm`` allow-lists exactly those types
(``nat_mm/safe_load.py``). These tests train with a real mmengine ``Runner`` on CPU:

* the checkpoint's globals are exactly the allowed set, and nothing else is allowed;
* without ``import nat_mm`` (a fresh subprocess) loading and resuming fail;
* resuming from the checkpoint at N/2 gives bitwise the final weights and every logged
  loss of an uninterrupted N-iteration run (toy model, and the NAT backbone).
"""
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch
import torch.nn as nn

import nat_mm  # noqa: F401  (installs the checkpoint allow-list)
from nat_mm import safe_load

mmengine = pytest.importorskip('mmengine')
from mmengine.evaluator import BaseMetric, Evaluator  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ITERS = 8


# ------------------------------------------------------------------ toy training setup
class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(16, 1))

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.body(inputs)
        if mode == 'loss':
            return {'loss': ((out - labels) ** 2).mean()}
        return out


class ToyDataset(torch.utils.data.Dataset):
    def __init__(self, size=40):
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(size, 6, generator=generator)
        self.y = torch.randn(size, 1, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return dict(inputs=self.x[index], labels=self.y[index])


class RecordLosses(Hook):
    """Records (iteration, loss as a Python float) after every training iteration."""
    priority = 'VERY_LOW'

    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append((runner.iter, float(outputs['loss'].detach()) if torch.is_tensor(outputs['loss']) else float(outputs['loss'])))


class CountPredictions(BaseMetric):
    """A metric for a validation loop whose only effect on training is its RNG use."""

    def process(self, data_batch, data_samples):
        self.results.append(len(data_samples))

    def compute_metrics(self, results):
        return dict(predictions=sum(results))


@pytest.fixture
def restore_determinism():
    """Runner(randomness=dict(deterministic=True)) flips process-wide switches."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def make_runner(work_dir, model, dataset, *, max_iters, resume_from=None,
                checkpoint_interval=N_ITERS // 2, batch_size=4, optimizer=None,
                param_scheduler='default', rng_hook=True, val_interval=None):
    """val_interval: also validate every that many iterations (the val dataloader draws
    its seed from the global RNG, between the checkpoint and the next training step)."""
    recorder = RecordLosses()
    hooks = [recorder] + ([safe_load.RNGStateHook()] if rng_hook else [])
    if param_scheduler == 'default':
        param_scheduler = [
            dict(type='LinearLR', start_factor=0.25, by_epoch=False, begin=0, end=3),
            dict(type='MultiStepLR', milestones=[5, 7], gamma=0.5, by_epoch=False)]
    runner = Runner(
        model=model,
        work_dir=str(work_dir),
        experiment_name=f'nat_mm_test_{uuid.uuid4().hex}',
        train_dataloader=dict(dataset=dataset, batch_size=batch_size, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=True),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=max_iters,
                       val_interval=val_interval or 10 ** 6),
        **(dict(val_dataloader=dict(dataset=dataset, batch_size=batch_size, num_workers=0,
                                    sampler=dict(type='DefaultSampler', shuffle=False),
                                    collate_fn=dict(type='default_collate')),
                val_cfg=dict(), val_evaluator=Evaluator([CountPredictions()]))
           if val_interval else {}),
        optim_wrapper=dict(optimizer=optimizer or dict(
            type='AdamW', lr=1e-2, weight_decay=0.05)),
        param_scheduler=param_scheduler,
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=checkpoint_interval,
                            by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks,
        randomness=dict(seed=2024, deterministic=True),
        load_from=None if resume_from is None else str(resume_from),
        resume=resume_from is not None,
        log_level='WARNING',
    )
    return runner, recorder


def assert_resume_bitwise(tmp_path, build_model, dataset, **kwargs):
    """Uninterrupted N iterations vs. N/2 + resume from the N/2 checkpoint."""
    full, full_losses = make_runner(tmp_path / 'full', build_model(), dataset,
                                    max_iters=N_ITERS, **kwargs)
    full.train()
    checkpoint = tmp_path / 'full' / f'iter_{N_ITERS // 2}.pth'
    assert checkpoint.is_file()

    # The interrupted run: a fresh process state would be best; a fresh Runner, model and
    # optimizer with different initial weights is what resume must overwrite.
    torch.manual_seed(999)
    resumed, resumed_losses = make_runner(tmp_path / 'resumed', build_model(), dataset,
                                          max_iters=N_ITERS, resume_from=checkpoint,
                                          **kwargs)
    resumed.train()

    assert resumed.iter == full.iter == N_ITERS
    expected = full_losses.losses[N_ITERS // 2:]
    assert [i for i, _ in resumed_losses.losses] == [i for i, _ in expected]
    for (it, got), (_, want) in zip(resumed_losses.losses, expected):
        assert got == want, f'iteration {it}: loss {got!r} != uninterrupted {want!r}'
    # mmengine's own log (message hub) agrees too
    hub_full = full.message_hub.get_scalar('train/loss').data[0][N_ITERS // 2:]
    hub_resumed = resumed.message_hub.get_scalar('train/loss').data[0][-(N_ITERS // 2):]
    assert hub_full.tolist() == hub_resumed.tolist()

    full_state = full.model.state_dict()
    resumed_state = resumed.model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, value in full_state.items():
        assert torch.equal(value, resumed_state[name]), f'{name} differs after resume'
    # optimizer state (AdamW moments and step) too
    full_opt = full.optim_wrapper.state_dict()['state']
    resumed_opt = resumed.optim_wrapper.state_dict()['state']
    for key, state in full_opt.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(
                resumed_opt[key][name])), f'optimizer state {key}/{name} differs'
    return checkpoint


# ------------------------------------------------------------------ the allow-list
def globals_beyond_torch_defaults(checkpoint):
    """Globals a checkpoint needs beyond torch's built-in allow-list (ours set aside)."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(checkpoint)))
    finally:
        torch.serialization.add_safe_globals(saved)


@pytest.fixture(scope='module')
def toy_checkpoint(tmp_path_factory):
    before = torch.are_deterministic_algorithms_enabled()
    work = tmp_path_factory.mktemp('toy_ckpt')
    runner, _ = make_runner(work, ToyModel(), ToyDataset(), max_iters=4,
                            checkpoint_interval=4)
    runner.train()
    torch.use_deterministic_algorithms(before)
    return work / 'iter_4.pth'


def test_import_installs_allow_list():
    safe = torch.serialization.get_safe_globals()
    names = set()
    for entry in safe:
        names.add(entry[1] if isinstance(entry, tuple) else
                  f'{entry.__module__}.{entry.__qualname__}')
    assert set(safe_load.allow_mm_checkpoint_types()) <= names
    assert safe_load.allow_mm_checkpoint_types() == sorted(safe_load.allowed_mm_globals())


def test_checkpoint_needs_exactly_the_allowed_globals(toy_checkpoint):
    """What an mmengine checkpoint contains beyond torch's defaults is exactly what we
    allow (modulo numpy-1.x aliases and dtype classes, which have no pickle name)."""
    needed = globals_beyond_torch_defaults(toy_checkpoint)
    allowed = set(safe_load.allowed_mm_globals())
    assert needed <= allowed, f'not allowed: {needed - allowed}'
    aliases = {name for name in allowed
               if name.startswith(('numpy.core.', 'numpy.dtypes.'))}
    assert allowed - aliases - ONE_CYCLE == needed  # (ONE_CYCLE: the OneCycleLR test)


def test_checkpoint_loads_with_weights_only(toy_checkpoint):
    checkpoint = torch.load(toy_checkpoint, map_location='cpu', weights_only=True)
    assert set(checkpoint) >= {'meta', 'state_dict', 'message_hub', 'optimizer'}
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert buffer.statistics('current') == buffer.data[0][-1]
    assert buffer.mean(2) == pytest.approx(buffer.data[0][-2:].mean())
    checkpoint = safe_load.safe_torch_load(toy_checkpoint)
    assert checkpoint['meta']['iter'] == 4


def test_mmengine_load_checkpoint(toy_checkpoint):
    from mmengine.runner import load_checkpoint
    model = ToyModel()
    checkpoint = load_checkpoint(model, str(toy_checkpoint), map_location='cpu')
    assert checkpoint['meta']['iter'] == 4


def test_getattr_is_not_a_real_getattr():
    from mmengine.logging import HistoryBuffer
    from mmengine.logging.history_buffer import HistoryBuffer as HB
    from mmengine.optim.scheduler import OneCycleLR
    one_cycle = OneCycleLR.__mro__[2]  # OneCycleParamScheduler, the functions' owner
    assert safe_load.checkpoint_attribute(HistoryBuffer, 'mean') is HB.mean
    assert safe_load.checkpoint_attribute(one_cycle, '_annealing_cos') is (
        one_cycle._annealing_cos)
    for owner, name in [(HistoryBuffer, '__init__'), (HistoryBuffer, 'update'),
                        (HistoryBuffer, '__class__'), (torch.Tensor, 'mean'),
                        (os, 'system'), (HistoryBuffer.mean, '__globals__'),
                        (one_cycle, 'step'), (one_cycle, '__init__'), (OneCycleLR, 'step'),
                        (one_cycle, 'mean'), (HistoryBuffer, '_annealing_cos'),
                        (one_cycle._annealing_cos, '__globals__'), (HistoryBuffer, ['min'])]:
        with pytest.raises(safe_load.UnsafeCheckpointError):
            safe_load.checkpoint_attribute(owner, name)


def _clean_env():
    env = dict(os.environ)
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    env.pop('TORCH_FORCE_WEIGHTS_ONLY_LOAD', None)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    return env


def _run_python(code):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                          env=_clean_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('import_nat_mm', [False, True])
def test_load_fails_without_allow_list(toy_checkpoint, import_nat_mm):
    """The bug and the fix, each in a fresh interpreter."""
    result = _run_python(f"""
        import pickle, sys, torch
        {'import nat_mm' if import_nat_mm else ''}
        from mmengine.runner import CheckpointLoader
        try:
            ckpt = CheckpointLoader.load_checkpoint({str(toy_checkpoint)!r}, 'cpu')
        except pickle.UnpicklingError as error:
            print('REFUSED', str(error).replace(chr(10), ' ')[:2000]); sys.exit(3)
        print('LOADED', ckpt['meta']['iter'])
        """)
    if import_nat_mm:
        assert result.returncode == 0, result.stderr[-3000:]
        assert 'LOADED 4' in result.stdout
    else:
        assert result.returncode == 3, (result.stdout + result.stderr)[-3000:]
        assert 'Weights only load failed' in result.stdout


def test_resume_fails_without_allow_list(toy_checkpoint, tmp_path):
    """``Runner(resume=True)`` -- what ``tools/train.py --resume`` does -- without nat_mm."""
    result = _run_python(f"""
        import pickle, sys, torch
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        import test_safe_load as t   # imports nat_mm: undo its allow-list below
        torch.serialization.clear_safe_globals()
        runner, _ = t.make_runner({str(tmp_path)!r}, t.ToyModel(), t.ToyDataset(),
                                  max_iters=8, resume_from={str(toy_checkpoint)!r})
        try:
            runner.train()
        except pickle.UnpicklingError:
            sys.exit(3)
        sys.exit(0)
        """)
    assert result.returncode == 3, (result.stdout + result.stderr)[-3000:]


# ------------------------------------------------------------------ resume, bitwise
def test_resume_bitwise_toy(tmp_path, restore_determinism):
    assert_resume_bitwise(tmp_path, ToyModel, ToyDataset())


def test_resume_without_rng_hook_is_not_bitwise(tmp_path, restore_determinism):
    """mmengine re-seeds on resume: without RNGStateHook the dropout masks after the
    resume point differ, so the resumed losses do not match (the hook is needed)."""
    with pytest.raises(AssertionError, match='loss'):
        assert_resume_bitwise(tmp_path, ToyModel, ToyDataset(), rng_hook=False)


def test_resume_bitwise_with_validation_after_the_checkpoint(tmp_path, restore_determinism):
    """The recipes validate right after saving: what validation draws from the RNG must not
    reach the uninterrupted run's next steps either."""
    assert_resume_bitwise(tmp_path, ToyModel, ToyDataset(), val_interval=N_ITERS // 2)


ONE_CYCLE = {'mmengine.optim.scheduler.param_scheduler.OneCycleParamScheduler'}


@pytest.mark.parametrize('anneal', ['cos', 'linear'])
def test_resume_bitwise_one_cycle(tmp_path, restore_determinism, anneal):
    """OneCycleLR's state holds its annealing function (pickled as a getattr on its class):
    its checkpoints were refused before that was allowed."""
    checkpoint = assert_resume_bitwise(
        tmp_path, ToyModel, ToyDataset(),
        param_scheduler=[dict(type='OneCycleLR', eta_max=0.05, total_steps=N_ITERS,
                              anneal_strategy=anneal, by_epoch=False)])
    assert ONE_CYCLE <= globals_beyond_torch_defaults(checkpoint) <= set(
        safe_load.allowed_mm_globals())


def test_resume_bitwise_sgd_momentum(tmp_path, restore_determinism):
    assert_resume_bitwise(tmp_path, ToyModel, ToyDataset(),
                          optimizer=dict(type='SGD', lr=0.05, momentum=0.9),
                          param_scheduler=[dict(type='PolyLR', eta_min=1e-4, power=0.9,
                                                by_epoch=False, begin=0, end=N_ITERS)])


class BackboneClassifier(BaseModel):
    """NAT/DiNAT backbone + pooled linear head on random 64x64 images."""

    def __init__(self, backbone_type):
        super().__init__()
        self.backbone = build_small_backbone(backbone_type)
        channels = self.backbone_channels
        self.head = nn.Linear(channels, 3)

    @property
    def backbone_channels(self):
        with torch.no_grad():
            feats = self.backbone(torch.zeros(1, 3, 64, 64))
        return feats[-1].shape[1]

    def forward(self, inputs, labels=None, mode='tensor'):
        feats = self.backbone(inputs)
        logits = self.head(feats[-1].mean((2, 3)))
        if mode == 'loss':
            return {'loss': nn.functional.cross_entropy(logits, labels)}
        return logits


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, size=16):
        generator = torch.Generator().manual_seed(7)
        self.images = torch.randn(size, 3, 64, 64, generator=generator)
        self.labels = torch.randint(0, 3, (size,), generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return dict(inputs=self.images[index], labels=self.labels[index])


def build_small_backbone(backbone_type):
    """A NAT/DiNAT 'mini' with shallow depths, from the registry the configs use."""
    models = pytest.importorskip('nat_mm.models')
    cls = getattr(models, backbone_type)
    return cls(**small_backbone_kwargs(backbone_type))


def small_backbone_kwargs(backbone_type):
    kwargs = dict(arch='mini', depths=(1, 1, 1, 1), kernel_size=3, drop_path_rate=0.1)
    if backbone_type == 'DiNAT':
        kwargs['dilations'] = ((1,), (1,), (1,), (1,))
    return kwargs


@pytest.mark.parametrize('backbone_type', ['NAT', 'DiNAT'])
def test_resume_bitwise_backbone(tmp_path, restore_determinism, backbone_type):
    checkpoint = assert_resume_bitwise(
        tmp_path, lambda: BackboneClassifier(backbone_type), ImageDataset(), batch_size=2)
    needed = globals_beyond_torch_defaults(checkpoint)
    assert needed <= set(safe_load.allowed_mm_globals())
