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


def check_same(reference: Tensor, ref_name: str, other: Tensor, name: str) -> None:
    if other.dtype != reference.dtype:
        raise TypeError(f'{name} has dtype {other.dtype} but {ref_name} has '
                        f'{reference.dtype}: cast them to one dtype'
                        f'{_autocast_note(reference.device)}')
    if other.device != reference.device:
        raise ValueError(f'{name} is on {other.device} but {ref_name} is on '
                         f'{reference.device}: move them to one device')


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


def check_qk(query, key, kernel_size, dilation, rpb):
    """Validated (kernel_size, dilation) pairs for na2d_qk."""
    kernel_size, dilation = check_kernel_size(kernel_size), check_dilation(dilation)
    check_tensor(query, 'query', 5, QKV_LAYOUT)
    check_tensor(key, 'key', 5, QKV_LAYOUT)
    check_same(query, 'query', key, 'key')
    if key.shape != query.shape:
        raise ValueError(f'key must have the shape of query {list(query.shape)}, got '
                         f'{list(key.shape)}')
    check_map_size(query.shape[2], query.shape[3], kernel_size, dilation)
    check_rpb(rpb, query, kernel_size)
    return kernel_size, dilation


def check_av(attn, value, kernel_size, dilation):
    """Validated (kernel_size, dilation) pairs for na2d_av."""
    kernel_size, dilation = check_kernel_size(kernel_size), check_dilation(dilation)
    check_tensor(value, 'value', 5, QKV_LAYOUT)
    check_tensor(attn, 'attn', 5, '[batch, heads, height, width, kernel_h*kernel_w]')
    check_same(value, 'value', attn, 'attn')
    window = kernel_size[0] * kernel_size[1]
    if attn.shape[-1] != window:
        raise ValueError(f'attn last dim must be kernel_h*kernel_w = {window}, got '
                         f'{attn.shape[-1]}: pass the kernel_size used for na2d_qk')
    if attn.shape[:4] != value.shape[:4]:
        raise ValueError(f'attn and value must agree in [batch, heads, height, width]: '
                         f'{list(attn.shape[:4])} vs {list(value.shape[:4])}')
    check_map_size(value.shape[2], value.shape[3], kernel_size, dilation)
    return kernel_size, dilation


def check_na2d(query, key, value, kernel_size, dilation, rpb, scale):
    """Validated (kernel_size, dilation, scale) for the fused na2d."""
    kernel_size, dilation = check_qk(query, key, kernel_size, dilation, rpb)
    check_tensor(value, 'value', 5, QKV_LAYOUT)
    check_same(query, 'query', value, 'value')
    if value.shape != query.shape:
        raise ValueError(f'value must have the shape of query {list(query.shape)}, got '
                         f'{list(value.shape)}')
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
