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


_reference_served: Dict[str, set] = {}
