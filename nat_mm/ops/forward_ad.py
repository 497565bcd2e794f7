"""Forward-mode AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``) through
the public NA functions.

torch.library has no forward-mode formulas for custom ops (torch 2.13): through the
compiled kernels the tangents would be dropped without an error (torch.func.jvp returned
zeros). Calls whose inputs carry a tangent therefore run the pure-PyTorch reference, whose
ops have forward-mode formulas, and say so once: correct, and slower. (Direct
``torch.ops.nat_mm`` calls cannot see the tangents; use the public functions.)
"""
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

_warned = False
_HALF = (torch.float16, torch.bfloat16)


def _has_tangent(t: Tensor) -> bool:
    # look through vmap's wrappers: unpack_dual has no batching rule (a vmap inside a jvp)
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return fwAD.unpack_dual(t).tangent is not None


def carries_tangent(tensors: Sequence[Optional[Tensor]]) -> bool:
    return any(isinstance(t, Tensor) and _has_tangent(t) for t in tensors)


def reference_with_tangents(fn: Callable[..., Tensor], *tensors: Optional[Tensor]) -> Tensor:
    """fn(*tensors), a pure-PyTorch reference, as precise as the kernels: float16/bfloat16
    inputs run in float32 (the kernels accumulate in float32) and the result is cast back;
    the casts carry the tangents."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn('nat_mm: forward-mode AD (jvp) through neighborhood attention runs the '
                      'slow pure-PyTorch reference: torch.library has no forward-mode '
                      'formulas for the compiled kernels.', RuntimeWarning, stacklevel=3)
    dtype = tensors[0].dtype
    if dtype not in _HALF:
        return fn(*tensors)
    return fn(*(None if t is None else t.float() for t in tensors)).to(dtype)
