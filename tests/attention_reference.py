"""The NAT / NATTEN attention module's math written out with the reference ops, to test
the layers against (upstream NAT and NATTEN's NeighborhoodAttention2D compute this)."""
import torch
from torch import nn

from nat_mm.ops import na2d_av_reference, na2d_qk_reference
from nat_mm.ops.validation import as_pair


def upstream_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """Pad bottom/right to the window, qkv, q * scale, qk + rpb, softmax, av, crop, proj."""
    b, h, w, c = x.shape
    kernel, dilation = as_pair(layer.kernel_size, 'k'), as_pair(layer.dilation, 'd')
    win_h, win_w = (k * d for k, d in zip(kernel, dilation))
    x = nn.functional.pad(x, (0, 0, 0, max(0, win_w - w), 0, max(0, win_h - h)))
    hp, wp = x.shape[1:3]
    qkv = layer.qkv(x).reshape(b, hp, wp, 3, layer.num_heads, c // layer.num_heads)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)
    attn = na2d_qk_reference(q * layer.scale, k, kernel, dilation, layer.rpb).softmax(-1)
    out = na2d_av_reference(attn, v, kernel, dilation).permute(0, 2, 3, 1, 4)
    return layer.proj(out.reshape(b, hp, wp, c)[:, :h, :w])
