"""FLOP and activation counts of the neighborhood-attention ops for mmengine's analysis.

Importing this module adds handles for ``nat_mm::na2d_qk``, ``nat_mm::na2d_av`` and
``nat_mm::na2d_fused`` to mmengine's default handle tables, so ``FlopAnalyzer`` and
``get_model_complexity_info`` count NA like every other op there: one multiply-add is
one flop (fvcore convention, as in the NAT paper), i.e. B*heads*H*W*kh*kw*D per
matmul; the fused op does two (QK^T and AV). Softmax and the bias add are not counted,
like elementwise ops elsewhere in mmengine.
"""
from collections import Counter
from math import prod
from typing import Any, Dict, List

from mmengine.analysis import complexity_analysis
from mmengine.analysis.jit_handles import Handle, get_shape

# Positions of the operands in the op schemas (nat_mm/ops/library.py).
QK_KERNEL_ARG = 3  # na2d_qk(query, key, rpb, kernel_size, dilation)
AV_KERNEL_ARG = 2  # na2d_av(attn, value, kernel_size, dilation)
FUSED_KERNEL_ARG = 4  # na2d_fused(query, key, value, rpb, kernel_size, dilation, scale)


def na_matmul_flops(qkv_shape: List[int], kernel_size: List[int]) -> int:
    """Multiply-adds of one NA matmul: B*heads*H*W*kh*kw*D."""
    return prod(qkv_shape) * prod(kernel_size)


def _kernel(value: Any) -> List[int]:
    """The int[2] kernel_size of a traced call: a constant or a traced list of them."""
    kernel = value.toIValue()
    if kernel is None and value.node().kind() == 'prim::ListConstruct':
        kernel = [item.toIValue() for item in value.node().inputs()]
    return list(kernel) if isinstance(kernel, (list, tuple)) else [kernel, kernel]


def na2d_qk_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    return na_matmul_flops(get_shape(inputs[0]), _kernel(inputs[QK_KERNEL_ARG]))


def na2d_av_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    return na_matmul_flops(get_shape(inputs[1]), _kernel(inputs[AV_KERNEL_ARG]))


def na2d_fused_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    return 2 * na_matmul_flops(get_shape(inputs[0]), _kernel(inputs[FUSED_KERNEL_ARG]))


def na_activation_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    return Counter({'neighborhood_attention': prod(get_shape(outputs[0]))})


FLOP_HANDLES: Dict[str, Handle] = {
    'nat_mm::na2d_qk': na2d_qk_flop_jit,
    'nat_mm::na2d_av': na2d_av_flop_jit,
    'nat_mm::na2d_fused': na2d_fused_flop_jit,
}
ACTIVATION_HANDLES: Dict[str, Handle] = {name: na_activation_jit for name in FLOP_HANDLES}


def register_handles() -> None:
    """Make every FlopAnalyzer / ActivationAnalyzer (and so get_model_complexity_info)
    created from now on count the NA ops."""
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.update(FLOP_HANDLES)
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS.update(ACTIVATION_HANDLES)


def flop_analyzer(model, inputs) -> complexity_analysis.FlopAnalyzer:
    """A FlopAnalyzer with the NA handles set explicitly."""
    return complexity_analysis.FlopAnalyzer(model, inputs).set_op_handle(**FLOP_HANDLES)


register_handles()
