"""Helpers shared by the backbone tests (no tests here): small models and
upstream-format checkpoints."""
import re
from typing import Dict, Optional, Sequence

import torch

from nat_mm.models import DiNAT

# A 4-level model small enough for fast CPU tests (head_dim 16).
TINY_KWARGS = dict(arch=None, embed_dims=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4),
                   mlp_ratio=2.0, drop_path_rate=0.)


def padded_dinat():
    """A small DiNAT whose levels pad in different regimes for different input sizes
    (graph capture tests): windows 15 / 9 / 3 / 3, so levels 0, 1 and 3 pad the maps of
    inputs up to 56 / 64 / 64 pixels; at 64x96, levels 1 and 3 pad rows only."""
    return DiNAT(**dict(TINY_KWARGS, kernel_size=3, depths=(2, 1, 1, 1),
                        dilations=[[1, 5], [3], [1], [1]]))


def upstream_state_dict(embed_dims: int, depths: Sequence[int], num_heads: Sequence[int],
                        mlp_ratio: float, layer_scale: bool = False, kernel_size: int = 7,
                        classifier: bool = True, generator: Optional[torch.Generator] = None
                        ) -> Dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of the upstream NAT classification
    model (NAT_REFERENCE.md §2), written down independently of nat_mm.models."""
    g = generator or torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    c, r = embed_dims, 2 * kernel_size - 1
    sd = {
        'patch_embed.proj.0.weight': rand(c // 2, 3, 3, 3),
        'patch_embed.proj.0.bias': rand(c // 2),
        'patch_embed.proj.1.weight': rand(c, c // 2, 3, 3), 'patch_embed.proj.1.bias': rand(c),
        'patch_embed.norm.weight': rand(c), 'patch_embed.norm.bias': rand(c),
    }
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim, hidden = c * 2**i, int(c * 2**i * mlp_ratio)
        for j in range(depth):
            p = f'levels.{i}.blocks.{j}.'
            sd.update({
                p + 'norm1.weight': rand(dim), p + 'norm1.bias': rand(dim),
                p + 'attn.qkv.weight': rand(3 * dim, dim), p + 'attn.qkv.bias': rand(3 * dim),
                p + 'attn.rpb': rand(heads, r, r),
                p + 'attn.proj.weight': rand(dim, dim), p + 'attn.proj.bias': rand(dim),
                p + 'norm2.weight': rand(dim), p + 'norm2.bias': rand(dim),
                p + 'mlp.fc1.weight': rand(hidden, dim), p + 'mlp.fc1.bias': rand(hidden),
                p + 'mlp.fc2.weight': rand(dim, hidden), p + 'mlp.fc2.bias': rand(dim),
            })
            if layer_scale:
                sd.update({p + 'gamma1': rand(dim), p + 'gamma2': rand(dim)})
        if i < len(depths) - 1:
            sd.update({
                f'levels.{i}.downsample.reduction.weight': rand(2 * dim, dim, 3, 3),
                f'levels.{i}.downsample.norm.weight': rand(2 * dim),
                f'levels.{i}.downsample.norm.bias': rand(2 * dim),
            })
    if classifier:
        last = c * 2**(len(depths) - 1)
        sd.update({'norm.weight': rand(last), 'norm.bias': rand(last),
                   'head.weight': rand(1000, last), 'head.bias': rand(1000)})
    return sd


def tiny_upstream_state_dict(**kwargs) -> Dict[str, torch.Tensor]:
    args = {k: TINY_KWARGS[k] for k in ('embed_dims', 'depths', 'num_heads', 'mlp_ratio')}
    args.update(kwargs)
    return upstream_state_dict(**args)


OUTPUT_NORM = re.compile(r'^norm\d\.')
