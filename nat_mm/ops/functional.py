"""Public neighborhood-attention functions (heads-first layout, like NAT/NATTEN <= 0.17)."""
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .autocast import autocast_inputs
from .forward_ad import carries_tangent, reference_with_tangents
from .library import kernel_layout, op
from .validation import IntOrPair, check_av, check_na2d, check_qk


def na2d_qk(query: Tensor, key: Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
            rpb: Optional[Tensor] = None) -> Tensor:
    """Neighborhood attention logits (unscaled: scale ``query`` first).

    query, key: [B, heads, H, W, D]; rpb: [heads, 2*kh-1, 2*kw-1] or None.
    Returns attn [B, heads, H, W, kh*kw], neighbors in row-major window order.
    """
    query, key, rpb = autocast_inputs((query, key, rpb))
    kernel_size, dilation = check_qk(query, key, kernel_size, dilation, rpb)
    if carries_tangent((query, key, rpb)):
        return reference_with_tangents(
            lambda q, k, b: reference.na2d_qk_reference(q, k, kernel_size, dilation, b),
            query, key, rpb)
    return op('na2d_qk')(query, key, rpb, kernel_size, dilation)


def na2d_av(attn: Tensor, value: Tensor, kernel_size: IntOrPair,
            dilation: IntOrPair = 1) -> Tensor:
    """Weighted sum of each query's neighbor values: attn [B, heads, H, W, kh*kw],
    value [B, heads, H, W, D] -> [B, heads, H, W, D]."""
    attn, value = autocast_inputs((attn, value))
    kernel_size, dilation = check_av(attn, value, kernel_size, dilation)
    if carries_tangent((attn, value)):
        return reference_with_tangents(
            lambda a, v: reference.na2d_av_reference(a, v, kernel_size, dilation), attn, value)
    return op('na2d_av')(attn, value, kernel_size, dilation)


def na2d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrPair,
         dilation: IntOrPair = 1, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None) -> Tensor:
    """Fused neighborhood attention: softmax(query key^T * scale + rpb) value.

    Never materializes the attention map; the backward recomputes it. ``scale``
    defaults to head_dim ** -0.5. Returns [B, heads, H, W, D].
    """
    query, key, value, rpb = autocast_inputs((query, key, value, rpb))
    kernel_size, dilation, scale = check_na2d(query, key, value, kernel_size, dilation, rpb,
                                              scale)
    if carries_tangent((query, key, value, rpb)):
        return reference_with_tangents(
            lambda q, k, v, b: reference.na2d_reference(q, k, v, kernel_size, dilation, b,
                                                        scale), query, key, value, rpb)
    saved = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, rpb))
    query, key, value = (kernel_layout(t, saved) for t in (query, key, value))
    return op('na2d_fused')(query, key, value, rpb, kernel_size, dilation, scale)[0]
