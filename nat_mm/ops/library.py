"""The ``nat_mm`` operator library: schemas (defined once, here), fake kernels, autograd.

Device kernels come from the C++/CUDA extension ``nat_mm._C`` (``csrc/register.cpp``
registers them for the CPU and CUDA dispatch keys of these schemas). A device the
extension does not serve gets the pure-PyTorch kernels of ``fallback.py``, with a
one-time warning.

Ops (all tensors heads-first ``[B, heads, H, W, ...]``):
  na2d_qk(query, key, rpb?, kernel_size, dilation)       -> attn [B, h, H, W, kh*kw]
  na2d_av(attn, value, kernel_size, dilation)            -> out  [B, h, H, W, D]
  na2d_inverse(weights, source, kernel_size, dilation)   -> per-key sum of weights*source
  na2d_rpb_grad(grad_attn, kernel_size, dilation)        -> [heads, 2kh-1, 2kw-1]
  na2d_fused(query, key, value, rpb?, kernel_size, dilation, scale) -> (out, lse)
  na2d_fused_backward(grad_out, query, key, value, rpb?, out, lse, kernel_size,
                      dilation, scale, grad_lse?)
                      -> (grad_query, grad_key, grad_value, grad_rpb)
``lse`` (the log-sum-exp of each query's logits) is float32 (float64 for float64 input);
na2d_fused's autograd differentiates it too (for direct callers; na2d discards it): the
fused backward takes its gradient ``grad_lse`` (d lse / d logits = p adds p * grad_lse
to the logits' gradient).
The autograd formulas here are the backward of each op's autograd.Function (autograd.py).
"""
import functools
import inspect

import torch
from torch._subclasses.fake_tensor import FakeTensor

NAMESPACE = 'nat_mm'
SCHEMAS = {
    'na2d_qk': 'na2d_qk(Tensor query, Tensor key, Tensor? rpb, int[2] kernel_size, '
               'int[2] dilation) -> Tensor',
    'na2d_av': 'na2d_av(Tensor attn, Tensor value, int[2] kernel_size, int[2] dilation) '
               '-> Tensor',
    'na2d_inverse': 'na2d_inverse(Tensor weights, Tensor source, int[2] kernel_size, '
                    'int[2] dilation) -> Tensor',
    'na2d_rpb_grad': 'na2d_rpb_grad(Tensor grad_attn, int[2] kernel_size, int[2] dilation) '
                     '-> Tensor',
    'na2d_fused': 'na2d_fused(Tensor query, Tensor key, Tensor value, Tensor? rpb, '
                  'int[2] kernel_size, int[2] dilation, float scale) -> (Tensor, Tensor)',
    'na2d_fused_backward': 'na2d_fused_backward(Tensor grad_out, Tensor query, Tensor key, '
                           'Tensor value, Tensor? rpb, Tensor out, Tensor lse, '
                           'int[2] kernel_size, int[2] dilation, float scale, '
                           'Tensor? grad_lse=None) -> (Tensor, Tensor, Tensor, Tensor)',
}

_lib = torch.library.Library(NAMESPACE, 'DEF')
for _schema in SCHEMAS.values():
    _lib.define(_schema)


def qualified(name: str) -> str:
    return f'{NAMESPACE}::{name}'


def op(name: str):
    return getattr(torch.ops.nat_mm, name).default


def call(name: str, *args):
    """Op ``name`` as the autograd formulas call it (autograd.call)."""
    from . import autograd  # (autograd imports this module)
    return autograd.call(name, *args)


def autocast_active(device_type: str) -> bool:
    """Whether an enabled torch.autocast region covers this device type."""
    if device_type in ('cpu', 'cuda'):
        # both have autocast: skip asking, since torch 2.11's dynamo cannot trace
        # is_autocast_available (torch.compile(fullgraph=True) of na2d failed there)
        return torch.is_autocast_enabled(device_type)
    return (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type))


def kernel_layout(map_: torch.Tensor, saved_for_backward: bool = False) -> torch.Tensor:
    """A [B, heads, H, W, C] map in the layout its device's kernels read best.

    The CPU kernels read any strides with contiguous channels, so views (NAT's q/k/v out of
    its qkv projection, grad_out out of the output projection's gradient) are read in
    place. Maps that autograd saves for the backward are made contiguous all the same: the
    fused backward read NAT's q/k/v views (columns 3*heads*D apart) 5-7% slower at
    detection sizes than copying them in the forward costs (docs/benchmarks.md). The CUDA
    kernels read contiguous maps: made so here once, so that autograd saves the contiguous
    tensors and the backward copies nothing again.
    """
    in_place = map_.device.type == 'cpu' and (map_.shape[-1] <= 1 or map_.stride(-1) == 1)
    return map_ if in_place and not saved_for_backward else map_.contiguous()


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake (meta) kernels
def _fake(name: str):
    """Registers a fake kernel of op ``name`` that checks its arguments where that is safe.

    A raw call with plain meta tensors (shape inference, a model built on the meta device)
    dispatches here and is checked as any device's call (``validation.RAW_OP_CHECKS``: the
    same faults refused with the same error types). So is a call mixing a meta tensor with
    real ones (Meta outranks CPU and CUDA), which would otherwise return uninitialised real
    tensors. Under torch.compile and export (fake tensors) only the devices are compared,
    at trace time: shapes are left to the device kernels (na2d_checks.cpp), so no guard on
    a symbolic size is made here.
    """
    def register(kernel):
        signature = inspect.signature(kernel)

        @functools.wraps(kernel)
        def checked(*args, **kwargs):
            tensors = [(arg, value) for arg, value in
                       signature.bind(*args, **kwargs).arguments.items()
                       if isinstance(value, torch.Tensor)]
            first, first_tensor = tensors[0]
            mixed = next(((arg, t) for arg, t in tensors[1:]
                          if t.device != first_tensor.device), None)
            if mixed or not isinstance(first_tensor, FakeTensor):
                from .validation import RAW_OP_CHECKS  # (validation imports this module)
                RAW_OP_CHECKS[name](*args, **kwargs)
            if mixed:  # (the checks above refuse it; kept in case they change)
                raise ValueError(  # as the kernels' checks (na2d_checks.cpp)
                    f'nat_mm: {mixed[0]} is on {mixed[1].device} but {first} is on '
                    f'{first_tensor.device}: move them to one device')
            return kernel(*args, **kwargs)

        return torch.library.register_fake(qualified(name))(checked)

    return register


@_fake('na2d_qk')
def _qk_fake(query, key, rpb, kernel_size, dilation):
    return query.new_empty((*query.shape[:4], kernel_size[0] * kernel_size[1]))


@_fake('na2d_av')
def _av_fake(attn, value, kernel_size, dilation):
    return value.new_empty(value.shape)


@_fake('na2d_inverse')
def _inverse_fake(weights, source, kernel_size, dilation):
    return source.new_empty(source.shape)


@_fake('na2d_rpb_grad')
def _rpb_grad_fake(grad_attn, kernel_size, dilation):
    return grad_attn.new_empty(
        (grad_attn.shape[1], 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1))


@_fake('na2d_fused')
def _fused_fake(query, key, value, rpb, kernel_size, dilation, scale):
    return (value.new_empty(value.shape),
            query.new_empty(query.shape[:4], dtype=lse_dtype(query.dtype)))


@_fake('na2d_fused_backward')
def _fused_backward_fake(grad_out, query, key, value, rpb, out, lse, kernel_size,
                         dilation, scale, grad_lse=None):
    heads = query.shape[1]
    return (query.new_empty(query.shape), key.new_empty(key.shape),
            value.new_empty(value.shape),
            query.new_empty((heads, 2 * kernel_size[0] - 1, 2 * kernel_size[1] - 1)))


# ---------------------------------------------------------------- autograd
def _save_operands(ctx, inputs, output):
    """na2d_qk, na2d_av, na2d_inverse: (first, second, [rpb,] kernel_size, dilation); each
    gradient needs the two tensor operands and the window."""
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.window = tuple(inputs[-2:])


def _operand_grads(ctx, grad, grad_first, grad_second):
    """The gradients of the two operands saved by _save_operands, each only if needed:
    grad_first / grad_second(grad, first, second, kernel_size, dilation)."""
    first, second = ctx.saved_tensors
    need_first, need_second = ctx.needs_input_grad[:2]
    return (grad_first(grad, first, second, *ctx.window) if need_first else None,
            grad_second(grad, first, second, *ctx.window) if need_second else None)


def _qk_backward(ctx, grad_attn):
    grad_attn = grad_attn.contiguous()
    grad_q, grad_k = _operand_grads(
        ctx, grad_attn, lambda g, query, key, *w: call('na2d_av', g, key, *w),
        lambda g, query, key, *w: call('na2d_inverse', g, query, *w))
    grad_rpb = (call('na2d_rpb_grad', grad_attn, *ctx.window) if ctx.needs_input_grad[2]
                else None)
    return grad_q, grad_k, grad_rpb, None, None


def _av_backward(ctx, grad_out):
    return _operand_grads(
        ctx, kernel_layout(grad_out),
        lambda g, attn, value, *w: call('na2d_qk', g, value, None, *w),
        lambda g, attn, value, *w: call('na2d_inverse', attn, g, *w)) + (None, None)


def _fused_setup(ctx, inputs, output):
    query, key, value, rpb, kernel_size, dilation, scale = inputs
    out, lse = output
    # an unused output's gradient comes as None, not zeros (na2d discards lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(query, key, value, rpb, out, lse)
    ctx.window = (kernel_size, dilation, scale)


def _fused_backward(ctx, grad_out, grad_lse):
    query, key, value, rpb, out, lse = ctx.saved_tensors
    kernel_size, dilation, scale = ctx.window
    if grad_out is None and grad_lse is None:  # (neither output used)
        return (None, ) * 7
    if grad_out is not None:
        grad_out = kernel_layout(grad_out)
    if torch.is_grad_enabled():
        # backward(create_graph=True): the fused backward kernel has no derivative of its
        # own, so the unfused ops build the gradients
        grads = _fused_grads_differentiable(grad_out, grad_lse, query, key, value, rpb,
                                            kernel_size, dilation, scale)
    else:
        # lse alone used: out's gradient is zero (and value's then too)
        go = torch.zeros_like(out) if grad_out is None else grad_out
        grads = op('na2d_fused_backward')(go, query, key, value, rpb, out, lse, kernel_size,
                                          dilation, scale, grad_lse)
    grad_q, grad_k, grad_v, grad_rpb = grads
    if rpb is None:
        grad_rpb = None
    if grad_out is None:  # lse does not depend on value
        grad_v = None
    return grad_q, grad_k, grad_v, grad_rpb, None, None, None


def attention_probabilities(query, key, rpb, window, scale):
    """The fused op's attention map, recomputed by the differentiable unfused op; the
    softmax runs in float32 (float64 for float64 input), as the kernels' does."""
    logits = call('na2d_qk', query * scale, key, rpb, *window)
    return logits.to(lse_dtype(logits.dtype)).softmax(-1).to(logits.dtype)


def _fused_grads_differentiable(grad_out, grad_lse, query, key, value, rpb, kernel_size,
                                dilation, scale):
    """The fused op's (grad_query, grad_key, grad_value, grad_rpb) from na2d_qk, na2d_av,
    na2d_inverse and na2d_rpb_grad, whose autograd formulas make the result
    differentiable again (double backward: gradient penalties, Hessian-vector products).
    The attention map is materialized; the softmax runs in float32 or float64. Either
    output gradient may be None (unused); without grad_out, grad_value is None."""
    window = (kernel_size, dilation)
    p = attention_probabilities(query, key, rpb, window, scale)
    ds, grad_value = 0, None  # (lse does not depend on value)
    if grad_out is not None:
        dp = call('na2d_qk', grad_out, value, None, *window)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        grad_value = call('na2d_inverse', p, grad_out, *window)
    if grad_lse is not None:  # d lse / d logits = p
        ds = ds + p * grad_lse.to(p.dtype)[..., None]
    return (call('na2d_av', ds, key, *window) * scale,
            call('na2d_inverse', ds, query, *window) * scale, grad_value,
            call('na2d_rpb_grad', ds, *window) if rpb is not None else None)


# na2d_inverse and na2d_rpb_grad serve the backward of the ops above; their own formulas
# make those backwards differentiable (create_graph=True), to any order.
def _inverse_backward(ctx, grad):
    # inverse(w, s)[key] = sum of w[q, n] * s[q] over the (query, neighbor) pairs on key
    return _operand_grads(
        ctx, kernel_layout(grad),
        lambda g, weights, source, *w: call('na2d_qk', source, g, None, *w),
        lambda g, weights, source, *w: call('na2d_av', weights, g, *w)) + (None, None)


def _rpb_grad_setup(ctx, inputs, output):
    grad_attn, kernel_size, dilation = inputs
    ctx.attn = (grad_attn.shape, grad_attn.dtype)
    ctx.window = (kernel_size, dilation)


def _rpb_grad_backward(ctx, grad_bias):
    # the transpose of summing into bias bins is gathering from them: na2d_qk's bias term
    # (queries and keys of zeros, one channel)
    (batch, heads, height, width, _), dtype = ctx.attn
    kernel_size, dilation = ctx.window
    bias = grad_bias.to(dtype).contiguous()
    zeros = bias.new_zeros((batch, heads, height, width, 1))
    return call('na2d_qk', zeros, zeros, bias, kernel_size, dilation), None, None


def _outside_autocast(backward):
    """``backward`` run in the dtypes autograd saved (as torch.amp.custom_bwd does): a
    backward inside an autocast region would otherwise cast some of its op calls' inputs
    and not others (the forward may have run in float32)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        device = next((g.device.type for g in grads if g is not None), 'cpu')
        if autocast_active(device):
            with torch.autocast(device, enabled=False):
                return backward(ctx, *grads)
        return backward(ctx, *grads)

    return run


# name: (setup_context, backward) of each differentiable op, the formulas of the ops'
# autograd.Functions (autograd.py)
AUTOGRAD_FORMULAS = {
    'na2d_qk': (_save_operands, _outside_autocast(_qk_backward)),
    'na2d_av': (_save_operands, _outside_autocast(_av_backward)),
    'na2d_fused': (_fused_setup, _outside_autocast(_fused_backward)),
    'na2d_inverse': (_save_operands, _outside_autocast(_inverse_backward)),
    'na2d_rpb_grad': (_rpb_grad_setup, _outside_autocast(_rpb_grad_backward)),
}
