"""Load OpenMMLab checkpoints with ``torch.load(weights_only=True)``.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: a restricted unpickler
that only builds tensors, containers and an allow-list of globals. mmengine 0.10.7 still
calls ``torch.load(filename, map_location=...)`` without ``weights_only`` and saves, next
to the weights, a ``meta`` dict and the ``message_hub`` state, which hold

* numpy scalars (``runtime_info['eta']`` is a ``numpy.float64``),
* numpy arrays and their dtypes (the history of every logged scalar),
* ``mmengine.logging.HistoryBuffer`` objects, whose ``statistics_methods`` dict refers to
  ``HistoryBuffer.min/max/current/mean`` through ``getattr(HistoryBuffer, 'min')``,
* with ``OneCycleLR``, the scheduler's ``anneal_func``, pickled as
  ``getattr(OneCycleParamScheduler, '_annealing_cos')`` (or ``'_annealing_linear'``).

So on torch >= 2.6 ``load_checkpoint``, ``Runner.resume`` and ``tools/train.py --resume``
fail with ``Weights only load failed``. This module fixes that *without* turning
``weights_only`` off: :func:`allow_mm_checkpoint_types` adds exactly these globals to
torch's allow-list (``torch.serialization.add_safe_globals``). ``builtins.getattr`` is
never allowed; the name is bound to :func:`checkpoint_attribute`, which resolves only the
class attributes named above and refuses anything else (a real ``getattr`` in the
allow-list would let a crafted pickle walk from any allowed class to ``eval``).

The allowed set was found empirically: a checkpoint saved by an mmengine ``Runner``
(mmengine 0.10.7, numpy 2.x) and by mmdet/mmseg training runs, listed with
``torch.serialization.get_unsafe_globals_in_checkpoint`` (see ``tests/test_safe_load.py``
and ``docs/reliability.md``). Checkpoints written with numpy 1.x name the same functions
``numpy.core.multiarray.*``; both spellings map to the same objects.

Usage::

    import nat_mm  # calls allow_mm_checkpoint_types()
    # or, explicitly
    from nat_mm.safe_load import allow_mm_checkpoint_types, safe_torch_load
    allow_mm_checkpoint_types()
    checkpoint = safe_torch_load('iter_100.pth')   # weights_only=True, clear errors

Resuming bitwise also needs the random number generators: mmengine re-seeds them on
resume, so dropout / drop-path masks after a resume differ from an uninterrupted run.
:class:`RNGStateHook` (``custom_hooks = [dict(type='RNGStateHook')]``) saves the torch
(CPU and CUDA), numpy and Python RNG states in each checkpoint and restores them when
training resumes; its values (tensors, a numpy uint32 array, tuples of ints) load with
``weights_only=True`` under the allow-list above.
"""
import pickle
import random
import types
from typing import Callable, Dict, List, Tuple, Union

import torch
from torch.torch_version import TorchVersion

__all__ = ['allow_mm_checkpoint_types', 'allowed_mm_globals', 'checkpoint_attribute',
           'safe_torch_load', 'UnsafeCheckpointError', 'RNGStateHook', 'get_rng_state',
           'set_rng_state', 'harden_mmengine_checkpoint_loader']

# HistoryBuffer's built-in statistics (mmengine/logging/history_buffer.py).
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')
# OneCycleParamScheduler's anneal_func (mmengine/optim/scheduler/param_scheduler.py).
_ONE_CYCLE_ANNEALING = ('_annealing_cos', '_annealing_linear')
# numpy dtypes that hold plain numbers. The dtype *class* is what the unpickler checks when
# it restores a dtype's state (BUILD); object, string, void and datetime dtypes stay out.
_NUMPY_NUMERIC_DTYPES = ('bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
                         'uint32', 'uint64', 'float16', 'float32', 'float64')

_installed: List[str] = []


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds something other than weights and plain metadata."""


def _checkpoint_attributes() -> Dict[type, set]:
    """{class: names of its functions that mm checkpoints pickle as getattr(class, name)}."""
    from mmengine.logging import HistoryBuffer
    from mmengine.optim.scheduler.param_scheduler import OneCycleParamScheduler
    return {HistoryBuffer: set(_HISTORY_BUFFER_STATISTICS) | set(
                HistoryBuffer._statistics_methods),
            OneCycleParamScheduler: set(_ONE_CYCLE_ANNEALING)}


def checkpoint_attribute(owner, name):
    """The only ``getattr`` a checkpoint may call: a HistoryBuffer statistic or a
    OneCycle annealing function (:func:`_checkpoint_attributes`).

    Bound to the pickle name ``builtins.getattr`` by :func:`allow_mm_checkpoint_types`.
    Returns the plain function (which the unpickler can then store, but not call).
    """
    allowed = _checkpoint_attributes()
    if isinstance(owner, type) and isinstance(name, str) and name in allowed.get(owner, ()):
        member = owner.__dict__.get(name)
        if isinstance(member, staticmethod):  # OneCycle's annealing functions
            member = member.__func__
        if isinstance(member, types.FunctionType):
            return member
    raise UnsafeCheckpointError(
        f'refusing getattr({getattr(owner, "__name__", type(owner).__name__)}, {name!r}) '
        f'in a checkpoint: only the statistics methods of mmengine HistoryBuffer '
        f'({", ".join(_HISTORY_BUFFER_STATISTICS)}) and the annealing functions of '
        f'OneCycleParamScheduler ({", ".join(_ONE_CYCLE_ANNEALING)}) may be looked up')


def allowed_mm_globals() -> Dict[str, Callable]:
    """{pickle name: object} of every global this module allows, by the name a pickle
    uses for it (the dtype classes have no pickle name; they are listed by class path)."""
    import numpy as np

    core = np._core if hasattr(np, '_core') else np.core  # numpy 2.x / 1.x
    allowed: Dict[str, Callable] = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype}
    try:
        owners = _checkpoint_attributes()
    except ImportError:  # no mmengine: nothing saved its message hub either
        pass
    else:
        for owner in owners:
            allowed[f'{owner.__module__}.{owner.__qualname__}'] = owner
        allowed['builtins.getattr'] = checkpoint_attribute
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        allowed[f'{module}._reconstruct'] = core.multiarray._reconstruct
        allowed[f'{module}.scalar'] = core.multiarray.scalar
    for name in _NUMPY_NUMERIC_DTYPES:
        dtype_class = type(np.dtype(name))
        if dtype_class is not np.dtype:  # numpy >= 1.25: one class per dtype
            allowed[f'{dtype_class.__module__}.{dtype_class.__qualname__}'] = dtype_class
    return allowed


def allow_mm_checkpoint_types() -> List[str]:
    """Allow-list (``torch.serialization.add_safe_globals``) exactly the globals that
    mmengine/mmdet/mmseg checkpoints hold, so ``torch.load(weights_only=True)`` -- the
    default since torch 2.6 -- reads them. Idempotent; returns the names allowed."""
    if _installed:
        return list(_installed)
    allowed = allowed_mm_globals()
    if TorchVersion(torch.__version__) >= '2.6':
        entries: List[Union[Callable, Tuple[Callable, str]]] = [
            (obj, name) for name, obj in allowed.items()]
    else:  # torch 2.4/2.5: no (object, name) entries; objects go by their own path
        entries = [obj for obj in allowed.values() if obj is not checkpoint_attribute]
    torch.serialization.add_safe_globals(entries)
    _installed.extend(sorted(allowed))
    return list(_installed)


def harden_mmengine_checkpoint_loader() -> None:
    """Make mmengine read local checkpoint files with an explicit ``weights_only=True``.

    mmengine's local loader calls ``torch.load`` without ``weights_only``, so it is safe
    only through torch's default: not on torch < 2.6, nor when the environment sets
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (which overrides only *unset* arguments).
    This re-registers mmengine's ``CheckpointLoader`` scheme for local paths (its public
    extension point) with a loader that passes ``weights_only=True`` and raises
    :class:`UnsafeCheckpointError` for anything else. ``load_checkpoint``, ``load_from``,
    ``resume``, ``init_detector`` / ``init_model`` all read local files through it.
    Idempotent.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    if CheckpointLoader._schemes.get('') is load_from_local_weights_only:
        return
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_weights_only,
                                     force=True)


# (named load_from_*: mmengine logs "Loads checkpoint by <name minus its first 10
# characters> backend", here "local_weights_only")
def load_from_local_weights_only(filename, map_location=None):
    import os.path as osp
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return safe_torch_load(filename, map_location=map_location)


def safe_torch_load(file, map_location='cpu'):
    """``torch.load(file, weights_only=True)`` with the mm allow-list installed.

    Raises :class:`UnsafeCheckpointError` (a ``pickle.UnpicklingError``) naming the file
    when it holds anything else -- e.g. a pickle that would run code -- without running it.
    """
    allow_mm_checkpoint_types()
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f'refusing to load {file!r}: it is not a plain weights/metadata checkpoint and '
            f'loading it could run code. It was rejected by torch.load(weights_only=True): '
            f'{_first_line(error)}') from error


def _first_line(error: BaseException) -> str:
    text = str(error)
    for marker in ('Unsupported global', 'Trying to', 'Can only', 'refusing'):
        index = text.find(marker)
        if index >= 0:
            return text[index:].split('\n')[0]
    return text.strip().split('\n')[0]


# ------------------------------------------------------------------ RNG state on resume
RNG_STATE_KEY = 'nat_mm_rng_state'


def get_rng_state() -> dict:
    """The torch (CPU, and CUDA when initialized), numpy and Python RNG states."""
    import numpy as np
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(),
             'python': random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    import numpy as np
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    python = state['python']
    random.setstate((python[0], tuple(python[1]), python[2]))
    if 'cuda' in state and torch.cuda.is_available():
        cuda = state['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


try:
    from mmengine.hooks import Hook as _Hook
    from mmengine.registry import HOOKS as _HOOKS
except ImportError:  # pragma: no cover - mmengine is a dependency of every mm config
    _Hook, _HOOKS = object, None


class RNGStateHook(_Hook):
    """Saves the RNG states in checkpoints and restores them on resume.

    mmengine restores weights, optimizer, schedulers, message hub and iteration, then
    re-seeds every RNG from ``randomness.seed``; anything random after the resume point
    (dropout, drop path, samplers drawing from the global RNG) then differs from the
    uninterrupted run. With this hook it does not.

    When: the state is captured as the checkpoint is written (after the iteration or
    epoch it follows) and restored right before the next training step -- in the resumed
    run, and in the uninterrupted one too, so that what runs in between there (the
    validation the recipes start right after saving: its dataloader draws a seed from the
    global RNG) does not reach training either. "Right before" is ``before_train_epoch``
    for epoch-based loops, the first ``before_train_iter`` for iteration-based ones (whose
    resume first fast-forwards the dataloader). Data augmentation in dataloader *workers*
    is seeded per worker by mmengine and replays on resume; with ``num_workers=0`` the
    augmentation of the fast-forwarded batches draws from the main RNG before it is
    restored, so the first resumed batch can be augmented differently.
    """
    priority = 'VERY_LOW'

    def __init__(self):
        self._pending = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[RNG_STATE_KEY] = self._pending = get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get(RNG_STATE_KEY)

    def _restore(self) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    def before_train_epoch(self, runner) -> None:
        from mmengine.runner import EpochBasedTrainLoop
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            self._restore()

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._restore()


if _HOOKS is not None:
    _HOOKS.register_module(module=RNGStateHook, force=False)
