"""Deployment: the backbone as an exported program and as an ONNX model.

``torch.export`` keeps the NA ops as the custom ops ``nat_mm::*`` (their compiled kernels
run the exported program and AOTInductor packages). ONNX has no neighborhood-attention
op, so for ONNX the ops are first decomposed into standard ones (gathers of each window
row's neighbors, batched matrix products, a softmax; the index math of the pure-PyTorch
reference), which ONNX Runtime runs like any other graph::

    from nat_mm.export import export_backbone, export_onnx
    program = export_backbone(model, min_size=48, max_size=1344)    # any batch, H, W
    export_onnx(model, 'nat_tiny.onnx', min_size=48, max_size=1344)
"""
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from .ops import reference
from .ops.library import lse_dtype, op

# Exported input sizes are multiples of this (export reasons about them as 16 * n).
SIZE_STEP = 16


def _window_rows(x: Tensor, rows: Tensor, all_cols: Tensor, m: int, kw: int) -> Tensor:
    """The kw neighbors in window row m of every query: [B, heads, H, W, kw, C]; all_cols:
    the column neighbors of every query, flattened ([W * kw])."""
    batch, heads, height, width, channels = x.shape
    picked = x.index_select(2, rows[:, m]).index_select(3, all_cols)
    return picked.reshape(batch, heads, height, width, kw, channels)


# One window row per step (kh steps of kw neighbors): a graph kw times smaller than the
# reference's one neighbor per step, at kw times one map's memory.
def _qk_decomposition(query, key, rpb, kernel_size, dilation):
    kh, kw = kernel_size
    rows, row_bias, cols, col_bias = reference.neighbors_2d(
        query.shape[2], query.shape[3], kernel_size, dilation, query.device)
    all_cols, query_column = cols.reshape(-1), query.unsqueeze(-1)
    scores = []
    for m in range(kh):
        s = torch.matmul(_window_rows(key, rows, all_cols, m, kw), query_column).squeeze(-1)
        if rpb is not None:
            s = s + rpb[:, row_bias[:, m]][:, :, col_bias]
        scores.append(s)
    return torch.cat(scores, dim=-1)


def _av_decomposition(attn, value, kernel_size, dilation):
    kh, kw = kernel_size
    rows, _, cols, _ = reference.neighbors_2d(value.shape[2], value.shape[3], kernel_size,
                                              dilation, value.device)
    all_cols, out = cols.reshape(-1), None
    for m in range(kh):
        part = torch.matmul(attn[..., m * kw:(m + 1) * kw].unsqueeze(-2),
                            _window_rows(value, rows, all_cols, m, kw)).squeeze(-2)
        out = part if out is None else out + part
    return out


def _fused_decomposition(query, key, value, rpb, kernel_size, dilation, scale):
    attn = _qk_decomposition(query * scale, key, rpb, kernel_size, dilation)
    lse = attn.to(lse_dtype(attn.dtype)).logsumexp(-1)
    return _av_decomposition(attn.softmax(-1), value, kernel_size, dilation), lse


def na_decompositions() -> Dict[object, object]:
    """The inference NA ops in standard torch ops (what an ONNX graph can hold)."""
    return {op('na2d_fused'): _fused_decomposition, op('na2d_qk'): _qk_decomposition,
            op('na2d_av'): _av_decomposition}


def export_backbone(model: nn.Module, min_size: int = 48, max_size: int = 2048,
                    max_batch: int = 64, example_size: Tuple[int, int] = (224, 224)
                    ) -> torch.export.ExportedProgram:
    """``torch.export`` of a NAT/DiNAT backbone in eval mode for any batch up to
    ``max_batch`` and any input height and width in [min_size, max_size] that are
    multiples of 16 (pad images to that, as mmdet's data preprocessor does with 32).
    ``min_size`` must be at least 48: a level-3 map of one row or column is a special case
    for export's size reasoning."""
    if min_size < 3 * SIZE_STEP:
        raise ValueError(f'min_size must be >= {3 * SIZE_STEP} pixels, got {min_size}')
    if any(s % SIZE_STEP or not min_size <= s <= max_size for s in example_size):
        raise ValueError(f'example_size must be multiples of {SIZE_STEP} in [min_size, '
                         f'max_size], got {example_size}')
    height, width = (torch.export.Dim(name, min=-(-min_size // SIZE_STEP),
                                      max=max_size // SIZE_STEP)
                     for name in ('height_16', 'width_16'))
    example = torch.randn(2, 3, *example_size)  # a batch of 2: 1 would be specialized
    shapes = {'x': {0: torch.export.Dim('batch', max=max_batch), 2: SIZE_STEP * height,
                    3: SIZE_STEP * width}}
    with torch.no_grad():
        return torch.export.export(model.eval(), (example, ), dynamic_shapes=shapes)


def decompose_na(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with the NA custom ops replaced by standard torch ops."""
    return program.run_decompositions(na_decompositions())  # the other ops stay as they are


def export_onnx(model: nn.Module, path: str, **export_kwargs) -> str:
    """Writes the backbone as an ONNX model with a dynamic batch, height and width (the
    arguments of ``export_backbone``); needs the ``onnx`` and ``onnxscript`` packages.
    Inputs ``x`` [batch, 3, height, width], outputs the feature maps of ``out_indices``."""
    program = decompose_na(export_backbone(model, **export_kwargs))
    torch.onnx.export(program, dynamo=True).save(path)
    return path
