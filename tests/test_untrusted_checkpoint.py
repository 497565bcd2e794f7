"""Untrusted checkpoints never run code (issue 7).

Crafted files whose unpickling would create a marker file are loaded through every path
nat_mm owns -- ``nat_mm.checkpoint`` (backbone ``init_cfg=dict(type='Pretrained')``),
``nat_mm.safe_load``, mmengine's ``load_checkpoint`` with our allow-list installed,
``tools/convert_checkpoint.py``, ``tools/test.py``, ``tools/image_demo.py`` and
``tools/train.py --resume``. Each must refuse with an error that says why, and the
marker must not exist afterwards. A control test proves the payloads are live: plain
``pickle.loads`` does create the marker.
"""
import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import nat_mm  # noqa: F401  (installs the allow-list: it must not open a hole)
from nat_mm import safe_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, 'tools')


# ------------------------------------------------------------------ payloads
class ExecPayload:
    """Unpickling calls builtins.exec(code): creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("pwned")',)


class SystemPayload(ExecPayload):
    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class SubprocessPayload(ExecPayload):
    def __reduce__(self):
        return subprocess.call, (['touch', self.marker],)


class PathTouchPayload(ExecPayload):
    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class _Getattr:
    """Pickles as getattr(owner, name) -- the gadget mm checkpoints make us name."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


class GetattrChainPayload(ExecPayload):
    """getattr(getattr(HistoryBuffer, 'update'), '__globals__') ... -> eval(code).

    With a real ``getattr`` allowed this walks from an allowed class to the module's
    globals; our ``builtins.getattr`` stand-in refuses at the first step."""

    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        globals_dict = _Getattr(_Getattr(HistoryBuffer, 'update'), '__globals__')
        return dict.get, (globals_dict, '__builtins__')


PAYLOADS = {
    'exec': ExecPayload,
    'os.system': SystemPayload,
    'subprocess': SubprocessPayload,
    'pathlib.touch': PathTouchPayload,
    'getattr-chain': GetattrChainPayload,
}


def write_checkpoint(path, payload, legacy=False):
    """An mm-looking checkpoint (real weights) with the payload in its metadata."""
    checkpoint = {
        'meta': {'epoch': 1, 'iter': 10, 'hook_msgs': payload},
        'state_dict': {'backbone.patch_embed.proj.0.weight': torch.zeros(2, 3, 3, 3)},
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / 'PWNED'
    yield path
    assert not path.exists(), f'the payload ran: {path} was created'


@pytest.fixture(params=sorted(PAYLOADS))
def evil(request, tmp_path, marker):
    return write_checkpoint(tmp_path / f'evil_{request.param}.pth',
                            PAYLOADS[request.param](marker))


@pytest.fixture
def evil_exec(tmp_path, marker):
    return write_checkpoint(tmp_path / 'evil.pth', ExecPayload(marker))


def test_payloads_are_live(tmp_path):
    """Control: unpickled without restrictions, every payload creates its marker."""
    for name, payload_cls in PAYLOADS.items():
        if name == 'getattr-chain':
            continue  # needs a call through dict.get; refused by construction below
        marker = tmp_path / f'live_{name.replace(".", "_")}'
        data = pickle.dumps(payload_cls(marker), protocol=2)
        subprocess.run([sys.executable, '-c',
                        'import pickle, sys; pickle.loads(sys.stdin.buffer.read())'],
                       input=data, check=True, timeout=60)
        assert marker.exists(), name


def test_checkpoint_is_a_real_torch_file(evil_exec):
    assert zipfile.is_zipfile(evil_exec)
    names = zipfile.ZipFile(evil_exec).namelist()
    assert any(n.endswith('data.pkl') for n in names)


# ------------------------------------------------------------------ in-process paths
def test_torch_load_default_refuses(evil):
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, map_location='cpu')


def test_safe_torch_load_refuses(evil):
    with pytest.raises(safe_load.UnsafeCheckpointError, match='refusing to load'):
        safe_load.safe_torch_load(evil)


def test_legacy_format_refused(tmp_path, marker):
    path = write_checkpoint(tmp_path / 'legacy.pth', ExecPayload(marker), legacy=True)
    assert not zipfile.is_zipfile(path)
    with pytest.raises(safe_load.UnsafeCheckpointError):
        safe_load.safe_torch_load(path)
    buffer = io.BytesIO(path.read_bytes())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, map_location='cpu')


def test_force_no_weights_only_env_does_not_open_our_paths(evil_exec, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns off torch's default, not our explicit
    weights_only=True (nat_mm.checkpoint, safe_load, the hardened mmengine loader)."""
    from mmengine.runner import CheckpointLoader
    checkpoint = pytest.importorskip('nat_mm.checkpoint')
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.raises(safe_load.UnsafeCheckpointError):
        safe_load.safe_torch_load(evil_exec)
    with pytest.raises(checkpoint.CheckpointLoadError):
        checkpoint.read_checkpoint(str(evil_exec))
    safe_load.harden_mmengine_checkpoint_loader()
    with pytest.raises(safe_load.UnsafeCheckpointError):
        CheckpointLoader.load_checkpoint(str(evil_exec), map_location='cpu')


def test_nat_mm_checkpoint_refuses(evil):
    checkpoint = pytest.importorskip('nat_mm.checkpoint')
    with pytest.raises(checkpoint.CheckpointLoadError, match='not unpickled|weights_only'):
        checkpoint.read_checkpoint(str(evil))


def small_nat(**kwargs):
    models = pytest.importorskip('nat_mm.models')
    return models.NAT(arch='mini', depths=(1, 1, 1, 1), kernel_size=3, **kwargs)


def test_backbone_init_cfg_pretrained_refuses(evil):
    checkpoint = pytest.importorskip('nat_mm.checkpoint')
    model = small_nat(init_cfg=dict(type='Pretrained', checkpoint=str(evil)))
    with pytest.raises(checkpoint.CheckpointLoadError) as info:
        model.init_weights()
    assert str(evil) in str(info.value)
    assert 'trust' in str(info.value)  # tells the user what to do


def test_mmengine_load_checkpoint_refuses(evil):
    """What tools/test.py, tools/image_demo.py and --resume call, with nat_mm imported."""
    from mmengine.runner import load_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(small_nat(), str(evil), map_location='cpu')


# ------------------------------------------------------------------ the tools
def _clean_env():
    env = dict(os.environ)
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    env.pop('TORCH_FORCE_WEIGHTS_ONLY_LOAD', None)
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    return env


def run_tool(script, *args, timeout=300):
    path = os.path.join(TOOLS, script)
    if not os.path.isfile(path):
        pytest.fail(f'{path} is missing')
    result = subprocess.run([sys.executable, path, *map(str, args)], cwd=REPO,
                            env=_clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout + result.stderr


REFUSAL = ('Weights only load failed', 'weights_only', 'not unpickled',
           'refusing to load', 'Unsupported global')


def assert_refused(code, output, checkpoint):
    assert code != 0, f'the tool accepted {checkpoint}:\n{output[-3000:]}'
    assert any(text in output for text in REFUSAL), output[-3000:]
    assert 'Traceback' not in output or 'UnpicklingError' in output or \
        'CheckpointLoadError' in output, output[-3000:]


def test_convert_checkpoint_refuses(evil, tmp_path):
    out = tmp_path / 'converted.pth'
    code, output = run_tool('convert_checkpoint.py', evil, out)
    assert_refused(code, output, evil)
    assert not out.exists()


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory):
    """A few images of the synthetic demo sets (tools/make_demo_data.py)."""
    pytest.importorskip('cv2')
    root = tmp_path_factory.mktemp('demo_data')
    code, output = run_tool('make_demo_data.py', '--out', root, '--num-train', 2,
                            '--num-val', 2, '--seg-num-train', 2, '--seg-num-val', 2)
    assert code == 0, output[-3000:]
    return root


def demo_cfg_options(task, root):
    if task == 'det':
        coco = f'{root}/coco/'
        return ['--cfg-options', f'train_dataloader.dataset.data_root={coco}',
                f'val_dataloader.dataset.data_root={coco}',
                f'test_dataloader.dataset.data_root={coco}',
                f'val_evaluator.ann_file={coco}annotations/instances_val.json',
                f'test_evaluator.ann_file={coco}annotations/instances_val.json',
                'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
                'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
                'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False']
    ade = f'{root}/ade'
    return ['--cfg-options', f'train_dataloader.dataset.data_root={ade}',
            f'val_dataloader.dataset.data_root={ade}',
            f'test_dataloader.dataset.data_root={ade}',
            'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
            'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False']


DEMO_CONFIGS = {
    'det': ('mmdet', 'configs/detection/nat_mini_maskrcnn_demo.py'),
    'seg': ('mmseg', 'configs/segmentation/nat_mini_upernet_demo.py'),
}


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_tools_test_refuses(task, evil_exec, demo_data, tmp_path):
    package, config = DEMO_CONFIGS[task]
    pytest.importorskip(package)
    code, output = run_tool('test.py', config, evil_exec, '--work-dir', tmp_path / 'work',
                            *demo_cfg_options(task, demo_data))
    assert_refused(code, output, evil_exec)


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_tools_image_demo_refuses(task, evil_exec, demo_data, tmp_path):
    package, config = DEMO_CONFIGS[task]
    pytest.importorskip(package)
    image = sorted((demo_data / ('coco/val' if task == 'det' else
                                 'ade/images/validation')).glob('*.jpg'))[0]
    out = tmp_path / 'pred.png'
    code, output = run_tool('image_demo.py', image, config, evil_exec, '--out-file', out)
    assert_refused(code, output, evil_exec)
    assert not out.exists()


def test_tools_train_resume_refuses(evil_exec, demo_data, tmp_path):
    package, config = DEMO_CONFIGS['seg']
    pytest.importorskip(package)
    code, output = run_tool('train.py', config, '--resume', evil_exec,
                            '--work-dir', tmp_path / 'work',
                            *demo_cfg_options('seg', demo_data))
    assert_refused(code, output, evil_exec)


def test_getattr_gadget_refused_in_process(tmp_path, marker):
    """The restricted getattr stands in for builtins.getattr during weights_only loads."""
    from mmengine.logging import HistoryBuffer
    buffer = io.BytesIO()
    torch.save({'m': _Getattr(HistoryBuffer, 'update')}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
        torch.load(buffer, map_location='cpu')
    buffer = io.BytesIO()
    torch.save({'m': _Getattr(HistoryBuffer, 'mean')}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, map_location='cpu')
    assert loaded['m'] is HistoryBuffer.__dict__['mean']


def test_no_weights_only_false_in_our_code():
    """Our loading code never turns weights_only off. The one exception is the explicit,
    documented ``--trust-pickle`` opt-in of tools/convert_checkpoint.py."""
    exceptions = {'tools/convert_checkpoint.py'}
    found = {}
    for folder in ('nat_mm', 'tools'):
        for dirpath, _, filenames in os.walk(os.path.join(REPO, folder)):
            for filename in filenames:
                if filename.endswith('.py'):
                    path = os.path.join(dirpath, filename)
                    text = open(path, encoding='utf-8').read().replace(' ', '')
                    count = text.count('weights_only=False')
                    if count:
                        found[os.path.relpath(path, REPO)] = count
    assert set(found) <= exceptions, found
    convert = open(os.path.join(TOOLS, 'convert_checkpoint.py'), encoding='utf-8').read()
    for line in convert.splitlines():
        if 'weights_only=False' in line.replace(' ', '') and 'torch.load(' in line:
            assert 'trust' in line or 'trust_pickle' in convert, line


def test_error_message_is_clear(evil_exec):
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(f"""
        import nat_mm
        from nat_mm.safe_load import safe_torch_load
        safe_torch_load({str(evil_exec)!r})
        """)], cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert 'UnsafeCheckpointError' in last and 'refusing to load' in last
    assert 'builtins.exec' in last or 'exec' in last
