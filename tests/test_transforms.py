"""torch.func transforms and forward-mode AD over the public NA functions (the ops'
autograd.Functions, nat_mm/ops/autograd.py): grad, jacrev, hessian, vmap of grad, jvp,
jacfwd, dual tensors, against the pure-PyTorch reference and against reverse mode through
the compiled kernels; forward over forward is refused; direct torch.ops calls carry dual
tensors' tangents and are refused, with the fix, under torch.func's grad and jvp."""
import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

from nat_mm.ops import na2d
from nat_mm.ops.library import op
from nat_mm.ops.reference import na2d_av_reference, na2d_qk_reference, na2d_reference
from op_samples import public_calls

KERNEL, DILATION = (3, 5), (2, 1)

PUBLIC_CALLS = public_calls(KERNEL, DILATION)
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU'))]


def primals_and_tangents(seed=0, device='cpu'):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    shapes = [(1, 2, 9, 11, 4)] * 3 + [(2, 5, 9)]
    return [rand(*s) for s in shapes], [rand(*s) for s in shapes]


@pytest.mark.parametrize('name', list(PUBLIC_CALLS))
@pytest.mark.parametrize('device', DEVICES)
def test_jvp_and_grad_match_reverse_mode_through_the_kernels(device, name):
    call = PUBLIC_CALLS[name]
    primals, tangents = primals_and_tangents(device=device)
    out, tangent_out = torch.func.jvp(call, tuple(primals), tuple(tangents))
    # reverse mode (the compiled kernels' backward, differentiated again) gives the jvp too
    expected_out, expected = torch.autograd.functional.jvp(call, tuple(primals),
                                                           tuple(tangents))
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-10)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(tangent_out, expected, atol=1e-10, rtol=1e-8)

    def loss(*x):
        return call(*x).pow(2).sum()

    leaves = [x.clone().requires_grad_() for x in primals]
    expected = torch.autograd.grad(loss(*leaves), leaves, allow_unused=True)
    for g, e in zip(torch.func.grad(loss, argnums=(0, 1, 2, 3))(*primals), expected):
        torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, atol=1e-10,
                                   rtol=1e-8)


def test_dual_tensors_and_jacfwd():
    (q, k, v, rpb), (tq, *_) = primals_and_tangents()
    call = PUBLIC_CALLS['na2d']
    with fwAD.dual_level():
        out = call(fwAD.make_dual(q, tq), k, v, rpb)
        tangent = fwAD.unpack_dual(out).tangent
    _, expected = torch.autograd.functional.jvp(lambda x: call(x, k, v, rpb), q, tq)
    torch.testing.assert_close(tangent, expected, atol=1e-10, rtol=1e-8)

    small = q[:, :1, :6, :6], k[:, :1, :6, :6], v[:, :1, :6, :6]
    f = lambda x: na2d(x, small[1], small[2], 3)  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(f)(small[0]),
                               torch.autograd.functional.jacobian(f, small[0]),
                               atol=1e-10, rtol=1e-8)


def direct_calls(q, k, v, rpb):
    """{op name: (fn of the tensor arguments, those tensors)} for every differentiable op
    called through torch.ops (the fused op's lse output included)."""
    window = (list(KERNEL), list(DILATION))
    attn = op('na2d_qk')(q, k, rpb, *window)
    return {
        'na2d_qk': (lambda a, b, c: op('na2d_qk')(a, b, c, *window), (q, k, rpb)),
        'na2d_av': (lambda a, b: op('na2d_av')(a, b, *window), (attn, v)),
        'na2d_inverse': (lambda a, b: op('na2d_inverse')(a, b, *window), (attn, v)),
        'na2d_rpb_grad': (lambda a: op('na2d_rpb_grad')(a, *window), (attn, )),
        'na2d_fused': (lambda *t: torch.cat([x.flatten() for x in op('na2d_fused')(
            *t, *window, 0.5)]), (q, k, v, rpb)),  # lse too
    }


@pytest.mark.parametrize('name', ['na2d_qk', 'na2d_av', 'na2d_inverse', 'na2d_rpb_grad',
                                  'na2d_fused'])
def test_direct_op_calls_carry_dual_tangents(name):
    # the ops' Autograd kernels apply their Functions to dual tensors (before: the
    # tangents were dropped without an error)
    primals, _ = primals_and_tangents()
    fn, inputs = direct_calls(*primals)[name]
    gen = torch.Generator().manual_seed(3)
    tangents = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in inputs]
    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(x, t) for x, t in zip(inputs, tangents)))
        tangent = fwAD.unpack_dual(out).tangent
    _, expected = torch.autograd.functional.jvp(fn, inputs, tuple(tangents))
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(tangent, expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize('name', ['na2d_qk', 'na2d_av', 'na2d_inverse', 'na2d_rpb_grad',
                                  'na2d_fused'])
def test_direct_op_calls_gradcheck_in_both_modes(name):
    # numerical derivatives against reverse mode and forward mode (the fused op's lse
    # output included: the fused backward kernel takes its gradient)
    primals, _ = primals_and_tangents()
    fn, inputs = direct_calls(*primals)[name]
    inputs = [x.detach().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, fast_mode=True)


def test_lse_alone_double_backward():
    # a gradient of lse alone: value gets none (lse does not depend on it), and the
    # create-graph backward is differentiable again
    (q, k, v, rpb), _ = primals_and_tangents()
    small = [x[..., :6, :7, :] for x in (q, k, v)]
    inputs = [x.detach().requires_grad_() for x in (*small, rpb)]
    lse = lambda *t: op('na2d_fused')(*t, KERNEL, DILATION, 0.5)[1]  # noqa: E731
    grads = torch.autograd.grad(lse(*inputs).sum(), inputs, allow_unused=True)
    assert grads[2] is None and all(g is not None for g in grads[:2] + grads[3:])
    assert torch.autograd.gradgradcheck(lse, inputs, fast_mode=True)


@pytest.mark.parametrize('transform', ['grad', 'jvp'])
def test_direct_op_calls_under_torch_func_name_the_fix(transform):
    (q, k, v, rpb), _ = primals_and_tangents()
    fn, _ = direct_calls(q, k, v, rpb)['na2d_fused']
    loss = lambda x: fn(x, k, v, rpb).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match=r'na2d_fused was called directly under a '
                       r'torch\.func transform .* nat_mm\.ops\.na2d'):
        grad(loss)(q) if transform == 'grad' else jvp(loss, (q, ), (q, ))


@pytest.mark.parametrize('transform', ['grad', 'jvp'])
def test_direct_op_calls_on_constants_under_torch_func(transform):
    # inside grad/jvp every tensor is wrapped, constants too: a direct call that nothing
    # differentiates runs (the refusal above is for differentiated calls only)
    (q, k, v, rpb), _ = primals_and_tangents()
    fn, _ = direct_calls(q, k, v, rpb)['na2d_fused']

    def loss(x):
        return (x * fn(k * 2, k, v.detach(), rpb).sum()).sum()

    constant = fn(k * 2, k, v, rpb).sum()
    got = grad(loss)(q) if transform == 'grad' else jvp(loss, (q, ), (q, ))[1]
    expected = torch.full_like(q, constant) if transform == 'grad' else (q * constant).sum()
    torch.testing.assert_close(got, expected)


def test_functionalize_of_the_public_functions():
    # under vmap and functionalize alone the public functions call the op itself (its
    # Function is for grad and jvp: functionalize has no rule for it)
    (q, k, v, rpb), _ = primals_and_tangents()
    for name, fn in PUBLIC_CALLS.items():
        torch.testing.assert_close(torch.func.functionalize(fn)(q, k, v, rpb),
                                   fn(q, k, v, rpb), msg=name)


def test_jvp_of_vmap_and_vmap_inside_a_dual_level():
    (q, k, v, rpb), _ = primals_and_tangents()
    qs = torch.stack([q, 2 * q, q.flip(2)])
    call = lambda x: na2d(x, k, v, KERNEL, DILATION, rpb=rpb)  # noqa: E731
    tangents = torch.randn(qs.shape, generator=torch.Generator().manual_seed(5),
                           dtype=qs.dtype)
    _, got = torch.func.jvp(torch.func.vmap(call), (qs, ), (tangents, ))
    for i in range(len(qs)):
        _, expected = torch.autograd.functional.jvp(call, qs[i], tangents[i])
        torch.testing.assert_close(got[i], expected, atol=1e-10, rtol=1e-8)
    with fwAD.dual_level():  # no tangent anywhere: the kernels, under vmap
        torch.testing.assert_close(torch.func.vmap(call)(qs),
                                   torch.stack([call(x) for x in qs]))
        # dual tensors under vmap: the batching rule's op call carries their tangents
        got = fwAD.unpack_dual(torch.func.vmap(call)(fwAD.make_dual(qs, tangents))).tangent
    for i in range(len(qs)):
        _, expected = torch.autograd.functional.jvp(call, qs[i], tangents[i])
        torch.testing.assert_close(got[i], expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_jvp_primal_is_the_kernels_output(dtype):
    primals, tangents = primals_and_tangents()
    call = PUBLIC_CALLS['na2d']
    oracle = call(*primals)
    half = [t.to(dtype) for t in primals]
    out, _ = torch.func.jvp(call, tuple(half), tuple(t.to(dtype) for t in tangents))
    assert out.dtype == dtype
    torch.testing.assert_close(out, call(*half), atol=0, rtol=0)
    assert (out.double() - oracle).abs().max() < (2e-2 if dtype == torch.bfloat16 else 2e-3)


REFERENCES = {
    'na2d': lambda q, k, v, rpb: na2d_reference(q, k, v, KERNEL, DILATION, rpb=rpb),
    'na2d_qk': lambda q, k, v, rpb: na2d_qk_reference(q, k, KERNEL, DILATION, rpb),
    'na2d_av': lambda q, k, v, rpb: na2d_av_reference(
        na2d_qk_reference(q, k, KERNEL, DILATION, rpb).softmax(-1), v, KERNEL, DILATION),
}
SMALL = (1, 1, 7, 8, 2)  # for full Jacobians and Hessians


def small_inputs():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(SMALL, generator=gen, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.randn(1, 5, 9, generator=gen, dtype=torch.float64)


# second-order transforms of a scalar loss of the query, and first-order ones of all inputs
TRANSFORMS = {
    'grad': lambda loss, x: grad(loss, argnums=(0, 1, 2, 3))(*x),
    'vmap(grad)': lambda loss, x: vmap(grad(loss), in_dims=(0, None, None, None))(
        torch.stack([x[0], 2 * x[0]]), *x[1:]),
    'jacrev(jacrev)': lambda loss, x: jacrev(jacrev(loss))(*x),
    'hessian': lambda loss, x: hessian(loss)(*x),
    'jacrev(jacfwd)': lambda loss, x: jacrev(jacfwd(loss))(*x),
    'jvp(grad)': lambda loss, x: jvp(lambda a: grad(loss)(a, *x[1:]), (x[0], ),
                                     (torch.ones_like(x[0]), ))[1],
}


@pytest.mark.parametrize('transform', list(TRANSFORMS))
@pytest.mark.parametrize('name', list(PUBLIC_CALLS))
def test_transforms_match_the_reference(name, transform):
    def loss(fn):
        return lambda *x: fn(*x).pow(2).sum()

    inputs = small_inputs()
    got = TRANSFORMS[transform](loss(PUBLIC_CALLS[name]), inputs)
    expected = TRANSFORMS[transform](loss(REFERENCES[name]), inputs)
    got, expected = (x if isinstance(x, tuple) else (x, ) for x in (got, expected))
    assert max(e.abs().max() for e in expected) > 0.1
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize('nested', ['jvp(jvp)', 'jacfwd(jacfwd)'])
def test_forward_over_forward_is_refused(nested):
    q, k, v, rpb = small_inputs()
    f = lambda a: na2d(a, k, v, KERNEL, DILATION, rpb=rpb).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match='forward-mode AD over forward-mode AD'):
        if nested == 'jvp(jvp)':
            jvp(lambda a: jvp(f, (a, ), (a, ))[1], (q, ), (q, ))
        else:
            jacfwd(jacfwd(f))(q)


def test_transforms_inside_torch_compile_match_eager():
    # dynamo traces the ops, not their Functions: under grad or jvp the Function runs
    # outside the graph (a graph break) instead of the op getting no derivative
    (q, k, v, rpb), (tq, *_) = primals_and_tangents()
    call = lambda x: na2d(x, k, v, KERNEL, DILATION, rpb=rpb)  # noqa: E731
    loss = lambda x: call(x).pow(2).sum()  # noqa: E731
    compiled_jvp = torch.compile(lambda x, t: jvp(call, (x, ), (t, ))[1], backend='aot_eager')
    torch.testing.assert_close(compiled_jvp(q, tq), jvp(call, (q, ), (tq, ))[1])
    compiled_grad = torch.compile(lambda x: grad(loss)(x), backend='aot_eager')
    torch.testing.assert_close(compiled_grad(q), grad(loss)(q))


def test_importing_nat_mm_leaves_torch_dynamo_unimported():
    # the compile-only helpers (ops/compile_support.py) import it, where dynamo traces:
    # importing it costs about a second
    code = 'import sys, nat_mm; sys.exit("torch._dynamo" in sys.modules)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr or 'import nat_mm imported torch._dynamo'
