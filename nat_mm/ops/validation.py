"""Argument checks run in Python before any kernel, so bad input gets a clear message.

Every message names the argument and says how to fix it. Wrong types raise TypeError,
wrong values and shapes ValueError.
"""
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .library import autocast_active

IntOrPair = Union[int, Sequence[int]]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def as_pair(value: IntOrPair, name: str) -> Tuple[int, int]:
    """An int or an (h, w) pair of ints, as a tuple of two Python ints."""
    if _is_int(value):
        return int(value), int(value)
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
            _is_int(v) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(f'{name} must be an int or a pair of ints (height, width), '
                    f'got {value!r}')


def check_kernel_size(kernel_size: IntOrPair) -> Tuple[int, int]:
    pair = as_pair(kernel_size, 'kernel_size')
    for k in pair:
        if k < 3 or k % 2 == 0:
            raise ValueError(f'kernel_size must be odd and >= 3 along each axis, got '
                             f'{kernel_size!r}: use e.g. {max(3, k + 1 - k % 2)}')
    return pair


def check_dilation(dilation: IntOrPair) -> Tuple[int, int]:
    pair = as_pair(dilation, 'dilation')
    for d in pair:
        if d < 1:
            raise ValueError(f'dilation must be >= 1 along each axis, got {dilation!r}')
    return pair


def check_tensor(x, name: str, rank: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(x).__name__}')
    if x.is_nested:
        raise TypeError(f'{name} is a nested tensor: the NA ops take dense tensors; call '
                        f'them once per tensor of {name}.unbind()')
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f'{name} must be a floating tensor (float16, bfloat16, float32 or '
                        f'float64), got {x.dtype}: convert it with {name}.float()')
    if x.dim() != rank:
        raise ValueError(f'{name} must be {rank}-D {layout}, got shape {tuple(x.shape)}')


def _autocast_note(device: torch.device) -> str:
    # the public functions cast under autocast before these checks (autocast.py)
    if not autocast_active(device.type):
        return ''
    return (f' (inside torch.autocast, float32/float16/bfloat16 inputs were cast to '
            f'{torch.get_autocast_dtype(device.type)}; float64 ones are left as they are)')


def check_same_device(reference: Tensor, ref_name: str, other: Tensor, name: str) -> None:
    if other.device != reference.device:
        raise ValueError(f'{name} is on {other.device} but {ref_name} is on '
                         f'{reference.device}: move them to one device')


def check_same(reference: Tensor, ref_name: str, other: Tensor, name: str) -> None:
    if other.dtype != reference.dtype:
        raise TypeError(f'{name} has dtype {other.dtype} but {ref_name} has '
                        f'{reference.dtype}: cast them to one dtype'
                        f'{_autocast_note(reference.device)}')
    check_same_device(reference, ref_name, other, name)


def check_map_size(height: int, width: int, kernel_size: Tuple[int, int],
                   dilation: Tuple[int, int]) -> None:
    need_h, need_w = kernel_size[0] * dilation[0], kernel_size[1] * dilation[1]
    if height < need_h or width < need_w:
        raise ValueError(
            f'the feature map ({height}x{width}) is smaller than kernel_size*dilation '
            f'({need_h}x{need_w}): zero-pad it by {max(0, need_h - height)} rows (bottom) '
            f'and {max(0, need_w - width)} columns (right) and crop the output, or use a '
            f'smaller kernel_size/dilation')


def check_rpb(rpb: Optional[Tensor], query: Tensor, kernel_size: Tuple[int, int]) -> None:
    if rpb is None:
        return
    heads = query.shape[1]
    check_tensor(rpb, 'rpb', 3, '[heads, 2*kernel_h-1, 2*kernel_w-1]')
    check_same(query, 'query', rpb, 'rpb')
    expected = (heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)
    if tuple(rpb.shape) != expected:
        raise ValueError(f'rpb must have shape [heads, 2*kernel_h-1, 2*kernel_w-1] = '
                         f'{list(expected)}, got {list(rpb.shape)}')


QKV_LAYOUT = '[batch, heads, height, width, head_dim]'


def check_like_query(query, tensor, name):
    """A map with query's rank, dtype, device and shape (key, value, out, grad_out)."""
    check_tensor(tensor, name, 5, QKV_LAYOUT)
    check_same(query, 'query', tensor, name)
    if tensor.shape != query.shape:
        raise ValueError(f'{name} must have the shape of query {list(query.shape)}, got '
                         f'{list(tensor.shape)}')


def check_qk(query, key, kernel_size, dilation, rpb):
    """Validated (kernel_size, dilation) pairs for na2d_qk."""
    kernel_size, dilation = check_kernel_size(kernel_size), check_dilation(dilation)
    check_tensor(query, 'query', 5, QKV_LAYOUT)
    check_like_query(query, key, 'key')
    check_map_size(query.shape[2], query.shape[3], kernel_size, dilation)
    check_rpb(rpb, query, kernel_size)
    return kernel_size, dilation


def check_window_dim(weights, name, kernel_size):
    """The last dim of an attention-shaped map: one entry per neighbor."""
    window = kernel_size[0] * kernel_size[1]
    if weights.shape[-1] != window:
        raise ValueError(f'{name} last dim must be kernel_h*kernel_w = {window}, got '
                         f'{weights.shape[-1]}: pass the kernel_size used for na2d_qk')


def check_weights(weights, weights_name, source, source_name, kernel_size, dilation):
    """Validated (kernel_size, dilation) pairs for a [B, heads, H, W, kh*kw] weight map over
    a [B, heads, H, W, C] source (na2d_av: attn over value; na2d_inverse)."""
    kernel_size, dilation = check_kernel_size(kernel_size), check_dilation(dilation)
    check_tensor(source, source_name, 5, QKV_LAYOUT)
    check_tensor(weights, weights_name, 5, '[batch, heads, height, width, kernel_h*kernel_w]')
    check_same(source, source_name, weights, weights_name)
    check_window_dim(weights, weights_name, kernel_size)
    if weights.shape[:4] != source.shape[:4]:
        raise ValueError(f'{weights_name} and {source_name} must agree in [batch, heads, '
                         f'height, width]: {list(weights.shape[:4])} vs '
                         f'{list(source.shape[:4])}')
    check_map_size(source.shape[2], source.shape[3], kernel_size, dilation)
    return kernel_size, dilation


def check_av(attn, value, kernel_size, dilation):
    """Validated (kernel_size, dilation) pairs for na2d_av."""
    return check_weights(attn, 'attn', value, 'value', kernel_size, dilation)


def check_fused_maps(query, key, value, kernel_size, dilation, rpb):
    """Validated (kernel_size, dilation) pairs for the fused op's maps and bias."""
    kernel_size, dilation = check_qk(query, key, kernel_size, dilation, rpb)
    check_like_query(query, value, 'value')
    return kernel_size, dilation


def check_na2d(query, key, value, kernel_size, dilation, rpb, scale):
    """Validated (kernel_size, dilation, scale) for the fused na2d."""
    kernel_size, dilation = check_fused_maps(query, key, value, kernel_size, dilation, rpb)
    if scale is None:
        if query.shape[-1] == 0:
            raise ValueError('query has head_dim 0, so the default scale head_dim ** -0.5 '
                             'is undefined: pass scale explicitly')
        scale = query.shape[-1] ** -0.5
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f'scale must be a float or None, got {type(scale).__name__}')
    elif not torch.compiler.is_compiling() and not math.isfinite(scale):
        # (eager only: under torch.compile(dynamic=True) scale is traced as a symbolic
        # float, and a guard on its finiteness broke inductor's shape reasoning)
        raise ValueError(f'scale must be finite, got {scale}: pass e.g. head_dim ** -0.5 '
                         '(or None for that default)')
    return kernel_size, dilation, float(scale)


# ---------------------------------------------------------------- raw op calls
# The checks of each op's full argument list (torch.ops.nat_mm.*), for kernels that have no
# compiled checks of their own: the pure-PyTorch fallback (fallback.py). They refuse what
# the compiled kernels' checks (csrc/na2d_checks.cpp) refuse, with Python's error types and
# messages, and, as those, take any scale (the public na2d refuses a non-finite one).
def _check_per_query(query, tensor, name):
    """lse and its gradient: floating [batch, heads, height, width] on query's device."""
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        got = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
        raise TypeError(f'{name} must be a floating tensor [batch, heads, height, width], '
                        f'got {got}')
    check_same_device(query, 'query', tensor, name)
    if tensor.shape != query.shape[:4]:
        raise ValueError(f'{name} must have shape [batch, heads, height, width] = '
                         f'{list(query.shape[:4])}, got {list(tensor.shape)}')


def _check_rpb_grad(grad_attn, kernel_size, dilation):
    kernel_size, dilation = check_kernel_size(kernel_size), check_dilation(dilation)
    check_tensor(grad_attn, 'grad_attn', 5, '[batch, heads, height, width, kernel_h*kernel_w]')
    check_window_dim(grad_attn, 'grad_attn', kernel_size)
    check_map_size(grad_attn.shape[2], grad_attn.shape[3], kernel_size, dilation)


def _check_fused_backward(grad_out, query, key, value, rpb, out, lse, kernel_size, dilation,
                          scale, grad_lse=None):
    check_fused_maps(query, key, value, kernel_size, dilation, rpb)
    check_like_query(query, grad_out, 'grad_out')
    check_like_query(query, out, 'out')
    _check_per_query(query, lse, 'lse')
    if grad_lse is not None:
        _check_per_query(query, grad_lse, 'grad_lse')


RAW_OP_CHECKS = {
    'na2d_qk': lambda query, key, rpb, kernel_size, dilation: check_qk(
        query, key, kernel_size, dilation, rpb),
    'na2d_av': check_av,
    'na2d_inverse': lambda weights, source, kernel_size, dilation: check_weights(
        weights, 'weights', source, 'source', kernel_size, dilation),
    'na2d_rpb_grad': _check_rpb_grad,
    'na2d_fused': lambda query, key, value, rpb, kernel_size, dilation, scale:
        check_fused_maps(query, key, value, kernel_size, dilation, rpb),
    'na2d_fused_backward': _check_fused_backward,
}
