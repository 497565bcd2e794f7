"""Public neighborhood-attention functions (heads-first layout, like NAT/NATTEN <= 0.17)."""
from typing import Optional

import torch
from torch import Tensor

from .autocast import autocast_inputs
from .library import kernel_layout
from .autograd import call
from .validation import IntOrPair, check_av, check_na2d, check_qk


def na2d_qk(query: Tensor, key: Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
            rpb: Optional[Tensor] = None) -> Tensor:
    """Neighborhood attention logits (unscaled: scale ``query`` first).

    query, key: [B, heads, H, W, D]; rpb: [heads, 2*kh-1, 2*kw-1] or None.
    Returns attn [B, heads, H, W, kh*kw], neighbors in row-major window order.
    """
    query, key, rpb = autocast_inputs((query, key, rpb))
    kernel_size, dilation = check_qk(query, key, kernel_size, dilation, rpb)
    return call('na2d_qk', query, key, rpb, kernel_size, dilation)


def na2d_av(attn: Tensor, value: Tensor, kernel_size: IntOrPair,
            dilation: IntOrPair = 1) -> Tensor:
    """Weighted sum of each query's neighbor values: attn [B, heads, H, W, kh*kw],
    value [B, heads, H, W, D] -> [B, heads, H, W, D]."""
    attn, value = autocast_inputs((attn, value))
    kernel_size, dilation = check_av(attn, value, kernel_size, dilation)
    return call('na2d_av', attn, value, kernel_size, dilation)


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
    saved = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, rpb))
    query, key, value = (kernel_layout(t, saved) for t in (query, key, value))
    return call('na2d_fused', query, key, value, rpb, kernel_size, dilation, scale)[0]
