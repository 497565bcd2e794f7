"""Forward-mode AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``) through
the public NA functions.

torch.library has no forward-mode formulas for custom ops (torch 2.13): through the
compiled kernels the tangents would be dropped without an error (torch.func.jvp returned
zeros). Calls whose inputs carry a tangent therefore run the pure-PyTorch reference, whose
ops have forward-mode formulas, and say so once: correct, and slower. (Direct
``torch.ops.nat_mm`` calls cannot see the tangents; use the public functions.)
"""
import warnings
from typing import Optional, Sequence

import torch.autograd.forward_ad as fwAD
from torch import Tensor

_warned = False


def carries_tangent(tensors: Sequence[Optional[Tensor]]) -> bool:
    return any(isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None
               for t in tensors)


def warn_reference_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn('nat_mm: forward-mode AD (jvp) through neighborhood attention runs the '
                      'slow pure-PyTorch reference: torch.library has no forward-mode '
                      'formulas for the compiled kernels.', RuntimeWarning, stacklevel=3)
