"""Pure-PyTorch kernels for devices the compiled extension does not serve.

Registered per dispatch key only where the extension registered nothing. There each one
checks its arguments as the compiled kernels do (validation.RAW_OP_CHECKS: a raw op call
bypasses the public functions' checks) and warns once the first time it runs, so a slow
path is never taken silently.
"""
import functools
import warnings

import torch

from . import reference
from .library import lse_dtype, qualified
from .validation import RAW_OP_CHECKS

BUILD_HINT = ('build the extension with `pip install -e . --no-build-isolation` '
              '(see README)')
_warned = set()


def _warn_once(device_type: str) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    warnings.warn(f'nat_mm: no compiled neighborhood-attention kernels for {device_type}; '
                  f'using the slow pure-PyTorch reference. To get the fast kernels, '
                  f'{BUILD_HINT}.', RuntimeWarning, stacklevel=3)


def _qk(query, key, rpb, kernel_size, dilation):
    return reference.na2d_qk_reference(query, key, kernel_size, dilation, rpb)


def _av(attn, value, kernel_size, dilation):
    return reference.na2d_av_reference(attn, value, kernel_size, dilation)


def _inverse(weights, source, kernel_size, dilation):
    return reference.na2d_inverse_reference(weights, source, kernel_size, dilation)


def _rpb_grad(grad_attn, kernel_size, dilation):
    return reference.na2d_rpb_grad_reference(grad_attn, kernel_size, dilation)


def _logits(query, key, rpb, kernel_size, dilation, scale):
    acc = lse_dtype(query.dtype)
    return reference.na2d_qk_reference(query.to(acc) * scale, key.to(acc), kernel_size,
                                       dilation, None if rpb is None else rpb.to(acc))


def _fused(query, key, value, rpb, kernel_size, dilation, scale):
    logits = _logits(query, key, rpb, kernel_size, dilation, scale)
    lse = logits.logsumexp(-1)
    out = reference.na2d_av_reference((logits - lse[..., None]).exp(), value.to(lse.dtype),
                                      kernel_size, dilation)
    return out.to(value.dtype), lse


def _fused_backward(grad_out, query, key, value, rpb, out, lse, kernel_size, dilation,
                    scale, grad_lse=None):
    acc = lse.dtype
    grad_out, value = grad_out.to(acc), value.to(acc)
    probs = (_logits(query, key, rpb, kernel_size, dilation, scale) - lse[..., None]).exp()
    grad_probs = reference.na2d_qk_reference(grad_out, value, kernel_size, dilation)
    delta = (grad_out * out.to(acc)).sum(-1, keepdim=True)
    if grad_lse is not None:  # d lse / d logits = probs
        delta = delta - grad_lse.to(acc)[..., None]
    grad_logits = probs * (grad_probs - delta)
    grad_q = reference.na2d_av_reference(grad_logits, key.to(acc), kernel_size, dilation)
    grad_k = reference.na2d_inverse_reference(grad_logits, query.to(acc), kernel_size,
                                              dilation)
    grad_v = reference.na2d_inverse_reference(probs, grad_out, kernel_size, dilation)
    grad_rpb = reference.na2d_rpb_grad_reference(grad_logits, kernel_size, dilation)
    dtype = query.dtype
    return ((grad_q * scale).to(dtype), (grad_k * scale).to(dtype), grad_v.to(dtype),
            grad_rpb.to(dtype))


KERNELS = {
    'na2d_qk': _qk,
    'na2d_av': _av,
    'na2d_inverse': _inverse,
    'na2d_rpb_grad': _rpb_grad,
    'na2d_fused': _fused,
    'na2d_fused_backward': _fused_backward,
}


def has_compiled_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified(name), dispatch_key)


def _serving(name: str):
    """KERNELS[name] as the kernel of a device: arguments checked, one warning per device,
    outputs contiguous (the strides the fake kernels promise: torch.compile and opcheck
    hold the real outputs to them)."""
    kernel, check = KERNELS[name], RAW_OP_CHECKS[name]

    @functools.wraps(kernel)
    def serve(*args, **kwargs):
        check(*args, **kwargs)
        _warn_once(next(t for t in (*args, *kwargs.values())
                        if isinstance(t, torch.Tensor)).device.type)
        out = kernel(*args, **kwargs)
        return tuple(t.contiguous() for t in out) if isinstance(out, tuple) else out.contiguous()

    return serve


def register_missing(dispatch_keys=('CPU', 'CUDA')):
    """Register the reference for every (op, key) that has no compiled kernel.

    Returns {dispatch key: names of the ops the reference now serves there}.
    """
    served = {}
    for key in dispatch_keys:
        served[key] = set()
        for name in KERNELS:
            if not has_compiled_kernel(name, key):
                torch.library.impl(qualified(name), key)(_serving(name))
                served[key].add(name)
    return served
