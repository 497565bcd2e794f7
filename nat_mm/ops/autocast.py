"""Autocast for the NA ops: like matmul and scaled_dot_product_attention, they run in the
autocast dtype inside ``torch.autocast`` regions.

Under autocast, q/k/v come out of a Linear in float16/bfloat16 while a bias parameter
stays float32; the kernels want one dtype, so float32/float16/bfloat16 inputs are cast to
the region's dtype (float64 is left alone, as torch's autocast leaves it). The public
functions cast before their argument checks; the ops' Autocast kernels (below) do the
same for direct ``torch.ops.nat_mm`` calls.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .library import NAMESPACE, autocast_active, op

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
# the forward ops users call; the backward ops take float32 statistics (lse) as they are
AUTOCAST_OPS = ('na2d_qk', 'na2d_av', 'na2d_fused')
AUTOCAST_DEVICES = ('cpu', 'cuda')


def autocast_inputs(tensors: Sequence[Optional[Tensor]]) -> Tuple[Optional[Tensor], ...]:
    """``tensors`` cast to the autocast dtype of their device's enabled autocast region;
    unchanged outside one (None and non-tensors pass through)."""
    device = next((t.device.type for t in tensors if isinstance(t, Tensor)), None)
    if device is None or not autocast_active(device):
        return tuple(tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _CASTABLE else t
                 for t in tensors)


def _autocast_key(device: str) -> str:
    return 'Autocast' + torch._C._dispatch_key_for_device(device)  # AutocastCPU, ...


def _autocast_kernel(name: str, device: str):
    target = op(name)
    below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _autocast_key(device)))

    def kernel(*args):
        args = autocast_inputs(args)
        # run the op below autocast (what torch.library.register_autocast does)
        with torch._C._ExcludeDispatchKeyGuard(below):
            return target(*args)

    return kernel


_lib = torch.library.Library(NAMESPACE, 'IMPL')
for _device in AUTOCAST_DEVICES:
    for _name in AUTOCAST_OPS:
        _lib.impl(_name, _autocast_kernel(_name, _device), _autocast_key(_device))
