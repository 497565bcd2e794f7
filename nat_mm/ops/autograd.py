"""The NA ops' autograd: one autograd.Function per differentiable op, registered as the
op's Autograd kernel, so ordinary autograd, torch.func's transforms (grad, jacrev,
hessian, jvp, jacfwd, and vmap of them), forward-mode AD (``torch.autograd.forward_ad``)
and torch.compile all differentiate the same Function, whether the public functions or
``torch.ops.nat_mm`` are called.

Each Function has library.py's setup and backward formulas, forward-mode (jvp) formulas
built from the ops themselves, and a vmap rule generated from the ops' own (vmap.py).
``torch.library.register_autograd`` is not used: in torch 2.13 the Function it builds lacks
the ``setup_context`` staticmethod functorch requires (pytorch/pytorch#170834, #179652),
and it has no forward-mode formulas, so tangents were dropped without an error.
"""
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import library
from .library import op


def _has_tangent(t: Tensor) -> bool:
    # look through vmap's wrappers: unpack_dual has no batching rule (a vmap inside a jvp)
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return fwAD.unpack_dual(t).tangent is not None


def _differentiated(tensors: Sequence) -> bool:
    """Whether an op call on these tensors is differentiated: grad needed, or a tangent
    (a dual tensor's, or a torch.func jvp wrapper's) on one of them."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*tensors):
        return True
    # dual tensors exist only inside a forward_ad.dual_level (the check per tensor costs)
    return fwAD._current_level >= 0 and torch._C._is_fwd_grad_enabled() and any(
        isinstance(t, Tensor) and _has_tangent(t) for t in tensors)


def _refuse_transform_wrappers(name: str, tensors: Sequence):
    # torch.func's grad and jvp handle an autograd.Function applied above the dispatcher
    # (call() below), not one applied inside an Autograd kernel (torch 2.13: "could not
    # find kernel for HigherOrderOperator custom_function_call"); a direct op call that
    # they differentiate would otherwise lose its derivative. (Their constants are
    # wrapped too: those pass.)
    wrapped = [t for t in tensors
               if isinstance(t, Tensor) and torch._C._functorch.is_gradtrackingtensor(t)]
    if wrapped and _differentiated(wrapped):
        raise RuntimeError(
            f'torch.ops.nat_mm.{name} was called directly under a torch.func transform '
            '(grad, jacrev, hessian, jvp, jacfwd); call the public functions '
            'nat_mm.ops.na2d / na2d_qk / na2d_av instead, or '
            f"nat_mm.ops.autograd.call('{name}', ...) with the op's arguments")


def call(name: str, *args):
    """Op ``name`` on ``args``, as the public functions and the autograd formulas call it."""
    if torch.compiler.is_compiling():
        # dynamo traces the op, not its Function: under torch.func's grad or jvp inside a
        # compiled region the op alone would get no derivative (jvp gave zero tangents),
        # so the Function runs outside the graph there (a graph break). (Imported here:
        # its decorators import torch._dynamo, a second at import time.)
        from . import compile_support
        return compile_support.function_outside_the_graph(name, *args) \
            if compile_support.differentiating() else op(name)(*args)
    if torch._C._are_functorch_transforms_active() and differentiating():
        # functorch's grad and jvp handle a Function applied here, above the dispatcher,
        # not inside an Autograd kernel (vmap and functionalize take the op itself)
        return function_call(name, *args)
    return op(name)(*args)


def differentiating() -> bool:
    """Whether a torch.func grad or jvp transform is active."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() in (TransformType.Grad, TransformType.Jvp)
               for i in retrieve_all_functorch_interpreters())


def function_call(name: str, *args):
    """Op ``name`` applied as its autograd.Function (functorch enters it here)."""
    count = TENSOR_ARGUMENTS[name]
    return FUNCTIONS[name].apply(*args[:count], _Static(args[count:]))


# the leading arguments of each op that are tensors (or None); the rest are static
TENSOR_ARGUMENTS = {'na2d_qk': 3, 'na2d_av': 2, 'na2d_inverse': 2, 'na2d_rpb_grad': 1,
                    'na2d_fused': 4}


class _Static:
    """An op's non-tensor arguments (kernel_size, dilation, scale) as one opaque leaf:
    functorch's vmap of a nested jvp miscounted the leaves of tuple arguments (torch 2.13,
    "treespec.unflatten(leaves): `leaves` has length 4 but the spec ... 6 items")."""

    def __init__(self, values):
        self.values = tuple(values)


def _sum(terms) -> Optional[Tensor]:
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _bias_term(t_rpb: Optional[Tensor], like: Tensor, kernel_size, dilation):
    """na2d_qk's bias term alone (queries and keys of zeros, one channel): linear in rpb."""
    if t_rpb is None:
        return None
    zeros = like.new_zeros((*like.shape[:4], 1))
    return call('na2d_qk', zeros, zeros, t_rpb, kernel_size, dilation)


# ---------------------------------------------------------------- jvp formulas
# Each op is linear in each input (bilinear in two), except na2d_fused: its logits
# S = scale q.k + rpb are, and softmax's tangent is P * (tS - sum(P tS)).
def _term(name, first, second, *rest):
    """call(name, first, second, *rest); None where a tangent operand is None (zero)."""
    return None if first is None or second is None else call(name, first, second, *rest)


def _qk_tangent(query, key, t_query, t_key, t_rpb, window):
    return _sum([_term('na2d_qk', t_query, key, None, *window),
                 _term('na2d_qk', query, t_key, None, *window),
                 _bias_term(t_rpb, query, *window)])


def _qk_jvp(ctx, t_query, t_key, t_rpb, *_):
    query, key = ctx.saved_tensors
    return _qk_tangent(query, key, t_query, t_key, t_rpb, ctx.window)


def _bilinear_jvp(name):
    def jvp(ctx, t_first, t_second, *_):
        first, second = ctx.saved_tensors
        return _sum([_term(name, t_first, second, *ctx.window),
                     _term(name, first, t_second, *ctx.window)])

    return jvp


def _rpb_grad_jvp(ctx, t_grad_attn, *_):
    return call('na2d_rpb_grad', t_grad_attn, *ctx.window)


def _fused_jvp(ctx, t_query, t_key, t_value, t_rpb, *_):
    query, key, value, rpb, out, lse = ctx.saved_tensors
    kernel_size, dilation, scale = ctx.window
    window = (kernel_size, dilation)
    p = library.attention_probabilities(query, key, rpb, window, scale)
    t_logits = _qk_tangent(query * scale, key, None if t_query is None else t_query * scale,
                           t_key, t_rpb, window)
    t_lse = t_p = None
    if t_logits is not None:
        t_lse = (p * t_logits).sum(-1)
        t_p = p * (t_logits - t_lse[..., None])
    t_out = _sum([_term('na2d_av', t_p, value, *window),
                  _term('na2d_av', p, t_value, *window)])
    return (torch.zeros_like(out) if t_out is None else t_out,
            torch.zeros_like(lse) if t_lse is None else t_lse.to(lse.dtype))


def _refuse_forward_over_forward():
    # A jvp formula that runs inside another forward-mode level (jvp of jvp, jacfwd of
    # jacfwd) gave wrong second derivatives (torch 2.13: the saved operands lose the outer
    # tangents): refuse rather than answer wrongly.
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType
    levels = retrieve_all_functorch_interpreters()
    if sum(i.key() == TransformType.Jvp for i in levels) > 1:
        raise NotImplementedError(
            'nat_mm: forward-mode AD over forward-mode AD (jvp of jvp, jacfwd of jacfwd) '
            'is not supported by the NA ops; for second derivatives use '
            'torch.func.hessian (forward over reverse), jacrev of jacrev, or jvp of grad')


# ---------------------------------------------------------------- the Functions
def _operands(inputs, output):
    return inputs[0], inputs[1]


def _fused_operands(inputs, output):
    return (*inputs[:4], *output)  # query, key, value, rpb, out, lse


def _function(name, jvp, jvp_operands):
    """op ``name`` as an autograd.Function of (its tensor arguments, _Static(the others)):
    library.py's setup and backward, this jvp (reading the tensors jvp_operands(inputs,
    output) picks of the op's inputs), a generated vmap rule."""
    target = op(name)
    setup, backward = library.AUTOGRAD_FORMULAS[name]

    def op_inputs(inputs):
        *tensors, static = inputs
        return (*tensors, *static.values)

    def forward(*inputs):  # (grad and forward grad are off here: the kernel passes on)
        return target(*op_inputs(inputs))

    def setup_context(ctx, inputs, output):
        setup(ctx, op_inputs(inputs), output)
        ctx.save_for_forward(*jvp_operands(op_inputs(inputs), output))

    def function_backward(ctx, *grads):
        return (*backward(ctx, *grads)[:TENSOR_ARGUMENTS[name]], None)

    def function_jvp(ctx, *tangents):
        _refuse_forward_over_forward()
        return jvp(ctx, *tangents[:-1])

    return type(f'{name}_function', (torch.autograd.Function, ), {
        'generate_vmap_rule': True,
        'forward': staticmethod(forward),
        'setup_context': staticmethod(setup_context),
        'backward': staticmethod(function_backward),
        'jvp': staticmethod(function_jvp),
    })


FUNCTIONS = {name: _function(name, *formula) for name, formula in (
    ('na2d_qk', (_qk_jvp, _operands)),
    ('na2d_av', (_bilinear_jvp('na2d_av'), _operands)),
    ('na2d_inverse', (_bilinear_jvp('na2d_inverse'), _operands)),
    ('na2d_rpb_grad', (_rpb_grad_jvp, lambda inputs, output: ())),
    ('na2d_fused', (_fused_jvp, _fused_operands)),
)}


def _autograd_kernel(name):
    """The Autograd kernel of op ``name``: its Function where the call is differentiated,
    else the op below autograd."""
    count, target = TENSOR_ARGUMENTS[name], op(name)
    # autograd.Function.apply's Python part binds default arguments with inspect.signature
    # (~10 us a call; the Functions have none) and routes functorch, which this kernel
    # does not serve: the C++ apply under it does the rest
    apply = super(torch.autograd.Function, FUNCTIONS[name]).apply

    def kernel(keyset, *args):
        tensors = args[:count]
        if torch._C._are_functorch_transforms_active():
            _refuse_transform_wrappers(name, tensors)
        if _differentiated(tensors):
            return apply(*tensors, _Static(args[count:]))
        with torch._C._AutoDispatchBelowAutograd():
            return target.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


_lib = torch.library.Library(library.NAMESPACE, 'IMPL')
for _name in FUNCTIONS:
    _lib.impl(_name, _autograd_kernel(_name), 'Autograd', with_keyset=True)
