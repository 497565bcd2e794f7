"""The neighborhood-attention layer of NAT / DiNAT (parameter names as upstream)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nat_mm.ops import na2d, na2d_av, na2d_qk
from nat_mm.ops.validation import IntOrPair, as_pair, check_dilation, check_kernel_size


def _exporting() -> bool:
    # torch.export sets this flag while it traces; torch.compiler.is_exporting() returns it,
    # but torch 2.11's dynamo answers True for that call under torch.compile as well
    flag = getattr(torch.compiler, '_is_exporting_flag', None)
    if flag is not None:
        return bool(flag)
    is_exporting = getattr(torch.compiler, 'is_exporting', None)  # torch >= 2.5
    return bool(is_exporting and is_exporting())


def _shortfall(window: int, size):
    # torch.sym_max keeps a symbolic size (torch.export, dynamic shapes) free of a guard;
    # the plain max for the rest: ints (torch 2.11's dynamo cannot trace sym_max of them)
    # and the tensors jit tracing hands over (mmengine's FLOP counter)
    return torch.sym_max(0, window - size) if isinstance(size, torch.SymInt) else max(
        0, window - size)


class NeighborhoodAttention(nn.Module):
    """Multi-head 2D neighborhood attention with a relative position bias.

    Input and output are channels-last [B, H, W, C]. A map smaller than
    kernel_size * dilation is zero-padded bottom/right before the qkv projection and
    cropped afterwards (NATTEN <= 0.15 behaviour), so any input size works.
    ``kernel_size`` and ``dilation`` are ints or (h, w) pairs; ``rel_pos_bias=False``
    leaves out the bias (no ``rpb`` parameter); ``qk_scale`` replaces head_dim ** -0.5.
    """

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: IntOrPair = 7,
                 dilation: IntOrPair = 1, qkv_bias: bool = True,
                 attn_drop_rate: float = 0., proj_drop_rate: float = 0.,
                 rel_pos_bias: bool = True, qk_scale: Optional[float] = None):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims ({embed_dims}) must be divisible by num_heads '
                             f'({num_heads})')
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = self.head_dims ** -0.5 if qk_scale is None else qk_scale
        self.kernel_size = kernel_size
        self.dilation = dilation
        kernel_hw = check_kernel_size(kernel_size)
        check_dilation(dilation)
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_hw[0] - 1,
                                                2 * kernel_hw[1] - 1))
            nn.init.trunc_normal_(self.rpb, std=.02)
        else:
            self.register_parameter('rpb', None)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    @property
    def window(self):
        """(h, w) of the smallest map the ops accept; smaller inputs are padded up to it."""
        return tuple(k * d for k, d in zip(as_pair(self.kernel_size, 'kernel_size'),
                                           as_pair(self.dilation, 'dilation')))

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, '
                f'dilation={self.dilation}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'x must be 4-D channels-last [B, H, W, C], got shape '
                             f'{tuple(x.shape)}')
        height, width = x.shape[1:3]
        exporting = _exporting()
        pad_h, pad_w = (_shortfall(window, size)
                        for window, size in zip(self.window, (height, width)))
        # Eager skips the copy when nothing is padded; torch.export pads unconditionally
        # (by amounts that may be 0), so one exported program serves every input size
        # instead of guarding on the traced size's padding.
        if exporting or pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        batch, padded_h, padded_w, channels = x.shape
        qkv = self.qkv(x).reshape(batch, padded_h, padded_w, 3, self.num_heads,
                                  self.head_dims)
        query, key, value = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # [B, heads, H, W, D]
        out = self._attend(query, key, value)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        if exporting:  # a cropped copy: a view's layout would be guarded on its padding
            out = torch.narrow_copy(torch.narrow_copy(out, 1, 0, height), 2, 0, width)
        else:
            out = out[:, :height, :width]
        return self.proj_drop(self.proj(out))

    def _attend(self, query, key, value):
        rpb = self.rpb  # under autocast the NA ops cast it to the dtype of q/k/v
        # The fused op has no dropout inside; attention dropout needs the explicit map.
        if self.training and self.attn_drop.p > 0:
            attn = na2d_qk(query * self.scale, key, self.kernel_size, self.dilation,
                           rpb=rpb)
            attn = self.attn_drop(attn.softmax(dim=-1))
            return na2d_av(attn, value, self.kernel_size, self.dilation)
        return na2d(query, key, value, self.kernel_size, self.dilation, rpb=rpb,
                    scale=self.scale)
