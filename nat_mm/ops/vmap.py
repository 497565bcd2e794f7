"""Batching rules for ``torch.func.vmap`` over the NA ops.

Every op treats its heads independently and indexes the bias per head, so a vmapped
dimension of size N folds into the heads: maps [N, B, heads, H, W, ...] run as
[B, N*heads, H, W, ...] and biases [N, heads, ...] as [N*heads, ...], in one kernel call
(torch's per-sample fallback would loop over N and warn). An input without the vmapped
dimension is broadcast to it; folding copies each input once.
"""
import torch

from .library import SCHEMAS, qualified

BIAS_RANK = 3  # [heads, 2*kh-1, 2*kw-1]; the maps are [B, heads, H, W(, C)]


def _fold(x, bdim, size):
    """A tensor argument with the vmapped dim (at ``bdim``, or None: broadcast) folded
    into its heads dim."""
    if not isinstance(x, torch.Tensor):
        return x
    x = x.unsqueeze(0).expand(size, *x.shape) if bdim is None else x.movedim(bdim, 0)
    if x.dim() - 1 == BIAS_RANK:  # [N, heads, ...] -> [N*heads, ...]
        return x.reshape(size * x.shape[1], *x.shape[2:])
    x = x.transpose(0, 1)  # [B, N, heads, ...] -> [B, N*heads, ...]
    return x.reshape(x.shape[0], size * x.shape[2], *x.shape[3:])


def _unfold(y, size):
    """An op output with N*heads heads back to (tensor, its vmapped dim)."""
    if y.dim() == BIAS_RANK:
        return y.unflatten(0, (size, -1)), 0
    return y.unflatten(1, (size, -1)), 1


def _batching_rule(name):
    op = getattr(torch.ops.nat_mm, name).default

    def rule(info, in_dims, *args):
        size = info.batch_size
        out = op(*(_fold(x, d, size) for x, d in zip(args, in_dims)))
        if isinstance(out, torch.Tensor):
            return _unfold(out, size)
        pairs = [_unfold(y, size) for y in out]
        return tuple(y for y, _ in pairs), tuple(d for _, d in pairs)

    return rule


for _name in SCHEMAS:
    torch.library.register_vmap(qualified(_name), _batching_rule(_name))
