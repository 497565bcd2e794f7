"""Batching rules for ``torch.func.vmap`` over the NA ops: one kernel call per vmap
(torch's per-sample fallback would loop over the N samples and warn).

A vmapped dimension of size N folds into the batch: maps [N, B, heads, H, W, ...] run as
[N*B, heads, ...] (a view when the vmapped dim is the first and the map is laid out in
that order). Where samples differ in their bias (a vmapped rpb) or an op returns a bias
gradient, which sums over the batch, it folds into the heads instead, since every op treats
heads independently and indexes the bias per head: maps as [B, N*heads, ...] and biases
[N, heads, ...] as [N*heads, ...] (a copy of each map). An input without the vmapped
dimension is broadcast to it. Outputs come back with the vmapped dim first.
"""
import torch

from .library import SCHEMAS, op, qualified

BIAS_RANK = 3  # [heads, 2*kh-1, 2*kw-1]; the maps are [B, heads, H, W(, C)]
BIAS_GRAD_OPS = ('na2d_rpb_grad', 'na2d_fused_backward')


def _per_sample_shape(x, bdim):
    return x.shape if bdim is None else x.movedim(bdim, 0).shape[1:]


def _with_vmapped_first(x, bdim, size):
    return x.unsqueeze(0).expand(size, *x.shape) if bdim is None else x.movedim(bdim, 0)


def _fold_into_batch(x, bdim, size):
    if not isinstance(x, torch.Tensor) or x.dim() - (bdim is not None) == BIAS_RANK:
        return x  # non-tensors; an rpb that all samples share
    return _with_vmapped_first(x, bdim, size).flatten(0, 1)


def _fold_into_heads(x, bdim, size):
    if not isinstance(x, torch.Tensor):
        return x
    x = _with_vmapped_first(x, bdim, size)
    if x.dim() - 1 == BIAS_RANK:  # [N, heads, ...] -> [N*heads, ...]
        return x.flatten(0, 1)
    return x.transpose(0, 1).flatten(1, 2)  # [B, N, heads, ...] -> [B, N*heads, ...]


def _unfold_batch(y, size, batch, heads):
    return y.unflatten(0, (size, batch))


def _unfold_heads(y, size, batch, heads):
    if y.dim() == BIAS_RANK:
        return y.unflatten(0, (size, heads))
    return y.unflatten(1, (size, heads)).movedim(1, 0)


def _batching_rule(name):
    target = op(name)

    def rule(info, in_dims, *args):
        size = info.batch_size
        tensors = [(x, d) for x, d in zip(args, in_dims) if isinstance(x, torch.Tensor)]
        by_heads = name in BIAS_GRAD_OPS or any(
            d is not None and x.dim() - 1 == BIAS_RANK for x, d in tensors)
        fold, unfold = ((_fold_into_heads, _unfold_heads) if by_heads else
                        (_fold_into_batch, _unfold_batch))
        try:
            out = target(*(fold(x, d, size) for x, d in zip(args, in_dims)))
        except (RuntimeError, TypeError, ValueError):
            if size:  # the op's own message about one sample's shapes, not the folded ones
                target(*(x.select(d, 0) if isinstance(x, torch.Tensor) and d is not None
                         else x for x, d in zip(args, in_dims)))
            raise
        # every op's first argument is a map [B, heads, ...]
        batch, heads = _per_sample_shape(args[0], in_dims[0])[:2]
        outs = (out, ) if isinstance(out, torch.Tensor) else out
        outs = tuple(unfold(y, size, batch, heads) for y in outs)
        if isinstance(out, torch.Tensor):
            return outs[0], 0
        return outs, (0, ) * len(outs)  # vmapped dim first (another breaks torch.export)

    return rule


for _name in SCHEMAS:
    torch.library.register_vmap(qualified(_name), _batching_rule(_name))
