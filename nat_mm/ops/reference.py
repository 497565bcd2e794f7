"""Pure-PyTorch neighborhood attention: the oracle every kernel is tested against.

Plain differentiable torch ops (index_select, sum, softmax), one neighbor at a time so
memory stays at a few copies of the input. Slow, but short and obviously right. The
semantics are those of ``docs/semantics.md`` (and ``csrc/na2d_index.h``).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

Pair = Tuple[int, int]


def axis_neighbors(length: int, kernel: int, dilation: int,
                   device=None) -> Tuple[Tensor, Tensor]:
    """Key indices and bias indices of every query along one axis, each [length, kernel]."""
    index = torch.arange(length, device=device)
    residue = index % dilation
    sub = index // dilation
    sub_len = (length - residue + dilation - 1) // dilation
    start = torch.minimum((sub - kernel // 2).clamp(min=0), sub_len - kernel)
    offsets = torch.arange(kernel, device=device)
    keys = (start[:, None] + offsets[None, :]) * dilation + residue[:, None]
    bias = start[:, None] + offsets[None, :] - sub[:, None] + kernel - 1
    return keys, bias


def neighbors_2d(height: int, width: int, kernel_size: Pair, dilation: Pair, device):
    rows, row_bias = axis_neighbors(height, kernel_size[0], dilation[0], device)
    cols, col_bias = axis_neighbors(width, kernel_size[1], dilation[1], device)
    return rows, row_bias, cols, col_bias


def _neighbor(x: Tensor, rows: Tensor, cols: Tensor, m: int, n: int) -> Tensor:
    """x[b, h, rows[i, m], cols[j, n], :] for every query (i, j)."""
    return x.index_select(2, rows[:, m]).index_select(3, cols[:, n])


def na2d_qk_reference(query: Tensor, key: Tensor, kernel_size: Pair, dilation: Pair,
                      rpb: Optional[Tensor] = None) -> Tensor:
    """attn[b, h, i, j, m*kw + n] = query[b, h, i, j] . key[neighbor (m, n)] (+ rpb)."""
    kh, kw = kernel_size
    height, width = query.shape[2:4]
    rows, row_bias, cols, col_bias = neighbors_2d(height, width, kernel_size, dilation,
                                                   query.device)
    scores = []
    for m in range(kh):
        for n in range(kw):
            s = (query * _neighbor(key, rows, cols, m, n)).sum(-1)
            if rpb is not None:
                s = s + rpb[:, row_bias[:, m]][:, :, col_bias[:, n]]
            scores.append(s)
    return torch.stack(scores, dim=-1)


def na2d_av_reference(attn: Tensor, value: Tensor, kernel_size: Pair,
                      dilation: Pair) -> Tensor:
    """out[b, h, i, j] = sum over neighbors (m, n) of attn[..., m*kw + n] * value[neighbor]."""
    kh, kw = kernel_size
    height, width = value.shape[2:4]
    rows, _, cols, _ = neighbors_2d(height, width, kernel_size, dilation, value.device)
    out = torch.zeros_like(value, dtype=torch.promote_types(attn.dtype, value.dtype))
    for m in range(kh):
        for n in range(kw):
            out = out + attn[..., m * kw + n, None] * _neighbor(value, rows, cols, m, n)
    return out


def na2d_reference(query: Tensor, key: Tensor, value: Tensor, kernel_size: Pair,
                   dilation: Pair, rpb: Optional[Tensor] = None,
                   scale: Optional[float] = None) -> Tensor:
    """softmax(query key^T * scale + rpb) value over each query's neighborhood."""
    if scale is None:
        scale = query.shape[-1] ** -0.5
    attn = na2d_qk_reference(query * scale, key, kernel_size, dilation, rpb)
    return na2d_av_reference(attn.softmax(dim=-1), value, kernel_size, dilation)


def na2d_inverse_reference(weights: Tensor, source: Tensor, kernel_size: Pair,
                           dilation: Pair) -> Tensor:
    """out[key] = sum over (query, neighbor) pairs hitting key of weights * source[query].

    The transpose of ``na2d_av_reference`` in its value argument: grad_key of QK and
    grad_value of AV are both this.
    """
    kh, kw = kernel_size
    batch, heads, height, width, dim = source.shape
    rows, _, cols, _ = neighbors_2d(height, width, kernel_size, dilation, source.device)
    acc_dtype = torch.promote_types(weights.dtype, source.dtype)
    out = source.new_zeros((height, width, batch, heads, dim), dtype=acc_dtype)
    src = source.permute(2, 3, 0, 1, 4).to(acc_dtype)
    wts = weights.permute(2, 3, 0, 1, 4).to(acc_dtype)
    for m in range(kh):
        for n in range(kw):
            key_rows = rows[:, m, None].expand(height, width)
            key_cols = cols[None, :, n].expand(height, width)
            out.index_put_((key_rows, key_cols), wts[..., m * kw + n, None] * src,
                           accumulate=True)
    return out.permute(2, 3, 0, 1, 4).to(source.dtype)


def na2d_rpb_grad_reference(grad_attn: Tensor, kernel_size: Pair, dilation: Pair) -> Tensor:
    """Gradient of the relative position bias: grad_attn summed into its bias bins."""
    kh, kw = kernel_size
    heads, height, width = grad_attn.shape[1:4]
    _, row_bias, _, col_bias = neighbors_2d(height, width, kernel_size, dilation,
                                             grad_attn.device)
    acc_dtype = torch.float64 if grad_attn.dtype == torch.float64 else torch.float32
    per_query = grad_attn.to(acc_dtype).sum(0).permute(1, 2, 0, 3)  # [H, W, heads, kh*kw]
    out = grad_attn.new_zeros((2 * kh - 1, 2 * kw - 1, heads), dtype=acc_dtype)
    for m in range(kh):
        for n in range(kw):
            bi = row_bias[:, m, None].expand(height, width)
            bj = col_bias[None, :, n].expand(height, width)
            out.index_put_((bi, bj), per_query[..., m * kw + n], accumulate=True)
    return out.permute(2, 0, 1).to(grad_attn.dtype)
