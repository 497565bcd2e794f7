"""NAT building blocks: tokenizer, MLP, block, downsampler and level (upstream names)."""
from typing import Optional, Sequence

import torch
import torch.utils.checkpoint as cp
from torch import nn

from .attention import NeighborhoodAttention
from .builders import build_activation, build_norm


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.:
            return x
        keep = 1. - self.drop_prob
        mask = x.new_empty((x.shape[0], ) + (1, ) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class ConvTokenizer(nn.Module):
    """Stem: two stride-2 3x3 convs (no activation between), then a norm. Stride 4.

    [B, in_channels, H, W] -> channels-last [B, H/4, W/4, embed_dims].
    """

    def __init__(self, in_channels: int, embed_dims: int, norm_cfg: dict):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, embed_dims // 2, 3, stride=2, padding=1),
            nn.Conv2d(embed_dims // 2, embed_dims, 3, stride=2, padding=1))
        self.norm = build_norm(norm_cfg, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_channels_last(self.proj(x)))


class ConvDownsampler(nn.Module):
    """Stride-2 3x3 conv doubling the channels, then a norm (channels-last in and out)."""

    def __init__(self, embed_dims: int, norm_cfg: dict):
        super().__init__()
        self.reduction = nn.Conv2d(embed_dims, 2 * embed_dims, 3, stride=2, padding=1,
                                   bias=False)
        self.norm = build_norm(norm_cfg, 2 * embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_channels_first(x)
        if torch.compiler.is_compiling():
            # With symbolic sizes (dynamic=True, or automatic dynamic after a size change)
            # inductor's convolution lowering fails on this view's strides (torch 2.13 /
            # 2.14: "ValueRangeError: Invalid ranges [0:-1]"); a contiguous copy lowers.
            # Copied under any compilation: dynamo shows the module its sizes as ints even
            # when they are symbolic. One activation-sized copy per downsampler.
            x = x.contiguous()
        return self.norm(to_channels_last(self.reduction(x)))


class Mlp(nn.Module):

    def __init__(self, embed_dims: int, hidden_dims: int, act_cfg: dict,
                 drop_rate: float = 0.):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = build_activation(act_cfg)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class NATBlock(nn.Module):
    """Pre-norm transformer block with neighborhood attention and optional layer scale.

    x = x + DropPath(gamma1 * attn(norm1(x))); x = x + DropPath(gamma2 * mlp(norm2(x))).
    With ``with_cp`` the block is recomputed in the backward pass (activation
    checkpointing, non-reentrant), trading compute for memory.
    """

    def __init__(self, embed_dims: int, num_heads: int, kernel_size: int = 7,
                 dilation: int = 1, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., layer_scale: Optional[float] = None,
                 norm_cfg: dict = dict(type='LN'), act_cfg: dict = dict(type='GELU'),
                 with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = build_norm(norm_cfg, embed_dims)
        self.attn = NeighborhoodAttention(embed_dims, num_heads, kernel_size, dilation,
                                          qkv_bias, attn_drop_rate, drop_rate)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = build_norm(norm_cfg, embed_dims)
        self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio), act_cfg, drop_rate)
        self.layer_scale = layer_scale
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((embed_dims, ), float(layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((embed_dims, ), float(layer_scale)))

    def _scaled(self, branch: torch.Tensor, gamma_name: str) -> torch.Tensor:
        return branch if self.layer_scale is None else getattr(self, gamma_name) * branch

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._scaled(self.attn(self.norm1(x)), 'gamma1'))
        return x + self.drop_path(self._scaled(self.mlp(self.norm2(x)), 'gamma2'))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and torch.is_grad_enabled():
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class NATLevel(nn.Module):
    """The blocks of one resolution, then (except for the last level) a downsampler.

    Returns (input of the next level, this level's output before downsampling).
    """

    def __init__(self, embed_dims: int, depth: int, num_heads: int,
                 dilations: Sequence[int], drop_path_rates: Sequence[float],
                 downsample: bool, norm_cfg: dict, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(
            NATBlock(embed_dims, num_heads, dilation=dilations[j],
                     drop_path_rate=drop_path_rates[j], norm_cfg=norm_cfg, **block_kwargs)
            for j in range(depth))
        self.downsample = ConvDownsampler(embed_dims, norm_cfg) if downsample else None

    def forward(self, x: torch.Tensor):
        for block in self.blocks:
            x = block(x)
        return (x if self.downsample is None else self.downsample(x)), x
