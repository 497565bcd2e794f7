"""Loads the compiled kernels (``nat_mm._C``) and reports which backend serves what."""
import importlib
import warnings
from typing import Dict, Optional

from . import fallback

_extension = None
_load_error: Optional[str] = None


def load() -> None:
    """Import the extension (its static initializers register the kernels), then give
    the reference kernels to every (op, device) it left empty."""
    global _extension, _load_error
    try:
        _extension = importlib.import_module('nat_mm._C')
    except ImportError as error:  # not built, or built against another torch
        _load_error = str(error)
        warnings.warn(f'nat_mm: the C++/CUDA extension nat_mm._C is not available '
                      f'({error}); neighborhood attention falls back to the slow '
                      f'pure-PyTorch reference. To fix it, {fallback.BUILD_HINT}.',
                      RuntimeWarning, stacklevel=2)
    _reference_served.update(fallback.register_missing())


def backend_info() -> Dict[str, object]:
    """Which implementation serves each device, and how the extension was built."""
    info: Dict[str, object] = {
        'extension': _extension is not None,
        'extension_error': _load_error,
    }
    for device, key in (('cpu', 'CPU'), ('cuda', 'CUDA')):
        info[device] = 'reference' if _reference_served.get(key) else 'compiled'
    if _extension is not None:
        info.update(_extension.build_info())
    return info


def cpu_scratch_stats() -> Dict[str, int]:
    """Bytes of CPU scratch memory the compiled kernels cache (free blocks kept for reuse)
    and hand out now. The CPU kernels take their temporaries and outputs from this pool so
    that repeated calls skip the page faults of fresh allocations; NAT_MM_CPU_SCRATCH_MB
    caps the cache (default 1024; 0 turns the pool off)."""
    if _extension is None:
        return {'cached_bytes': 0, 'in_use_bytes': 0}
    return dict(_extension.cpu_scratch_stats())


def release_cpu_scratch() -> int:
    """Free the cached CPU scratch blocks (like torch.cuda.empty_cache); returns bytes."""
    return int(_extension.release_cpu_scratch()) if _extension is not None else 0


_reference_served: Dict[str, set] = {}
