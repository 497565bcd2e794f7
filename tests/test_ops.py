"""nat_mm.ops against the pure-PyTorch reference: forward, every gradient, every dtype."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nat_mm.ops import (backend_info, na2d, na2d_av, na2d_av_reference, na2d_qk,
                        na2d_qk_reference, na2d_reference)
from nat_mm.ops import fallback
from nat_mm.ops.library import kernel_layout, op
from op_samples import OpLog, assert_double_backward, opcheck_samples

# (batch, heads, H, W, head_dim, kernel_size, dilation)
CASES = [
    (1, 1, 7, 7, 4, (3, 3), (1, 1)),          # smallest map with border everywhere
    (2, 2, 9, 11, 8, (3, 5), (2, 1)),         # rectangular kernel, dilation on one axis
    (1, 2, 13, 15, 33, (5, 3), (2, 3)),       # odd head dim, both axes dilated
    (2, 1, 14, 12, 16, (7, 7), (2, 1)),       # H == k*d exactly
    (1, 2, 21, 24, 32, (7, 7), (3, 3)),       # H == k*d exactly on both axes
    (1, 2, 20, 24, 32, (9, 13), (2, 1)),
    (1, 1, 16, 17, 8, (11, 13), (1, 1)),
    (1, 1, 13, 13, 8, (13, 13), (1, 1)),      # kernel == map
    (1, 2, 17, 19, 8, (3, 3), (4, 4)),        # dilation 4
]
LARGEST_KERNEL = (1, 1, 33, 31, 4, (31, 31), (1, 1))  # the largest kernel asked for


def _ids(case):
    return 'B{}h{}_{}x{}_D{}_k{}x{}_d{}x{}'.format(*case[:5], *case[5], *case[6])


def make_inputs(case, dtype, with_rpb=True, seed=0):
    batch, heads, height, width, dim, ks, _ = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    q, k, v = (rand(batch, heads, height, width, dim) for _ in range(3))
    rpb = rand(heads, 2 * ks[0] - 1, 2 * ks[1] - 1) if with_rpb else None
    return q, k, v, rpb


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, [x for x in inputs if x is not None], grad_out)


def assert_close_all(actual, expected, atol, rtol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e.double(), atol=atol, rtol=rtol)


def reference_fp64(fn, *tensors):
    """Run a reference on float64 copies of the tensors (for reduced-precision checks)."""
    copies = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    return copies, fn(*copies)


@pytest.mark.parametrize('case, with_rpb', [(c, True) for c in CASES + [LARGEST_KERNEL]] +
                         [(c, False) for c in CASES[:4]],
                         ids=lambda x: _ids(x) if isinstance(x, tuple) else ('rpb' if x else 'norpb'))
def test_fused_matches_reference_fp64(case, with_rpb):
    q, k, v, rpb = make_inputs(case, torch.float64, with_rpb)
    ks, dil = case[5], case[6]
    out = na2d(q, k, v, ks, dil, rpb=rpb)
    ref = na2d_reference(q, k, v, ks, dil, rpb=rpb)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    assert_close_all(grads(out, (q, k, v, rpb), g), grads(ref, (q, k, v, rpb), g), 1e-10, 1e-10)


def _fused_with_lse(q, k, v, rpb, ks, dil, scale):
    return op('na2d_fused')(q, k, v, rpb, list(ks), list(dil), scale)


def _reference_with_lse(q, k, v, rpb, ks, dil, scale):
    logits = na2d_qk_reference(q * scale, k, ks, dil, rpb=rpb)
    return na2d_reference(q, k, v, ks, dil, rpb=rpb, scale=scale), logits.logsumexp(-1)


@pytest.mark.parametrize('uses', ['out+lse', 'lse'])
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-10), (torch.float32, 1e-4),
                                        (torch.bfloat16, 5e-2)], ids=str)
@pytest.mark.parametrize('case', [CASES[0], CASES[1], CASES[2], CASES[7]], ids=_ids)
def test_fused_lse_gradient_runs_the_fused_kernel_and_matches_reference(case, dtype, tol,
                                                                         uses):
    # na2d_fused called directly, its lse differentiated: the fused backward kernel takes
    # lse's gradient (d lse / d logits = p), no composite
    q, k, v, rpb = make_inputs(case, dtype)
    ks, dil, scale = case[5], case[6], 0.3
    gen = torch.Generator().manual_seed(5)
    g_out, g_lse = (torch.randn(shape, generator=gen, dtype=torch.float64)
                    for shape in (q.shape, q.shape[:4]))

    def loss(out, lse):
        return (lse.double() * g_lse).sum() + (
            (out.double() * g_out).sum() if uses == 'out+lse' else 0)

    with OpLog() as log:
        got = torch.autograd.grad(loss(*_fused_with_lse(q, k, v, rpb, ks, dil, scale)),
                                  (q, k, v, rpb), allow_unused=True)
    assert [name for name, _ in log.calls] == ['na2d_fused', 'na2d_fused_backward']
    copies, (ref_out, ref_lse) = reference_fp64(
        lambda *t: _reference_with_lse(*t, ks, dil, scale), q, k, v, rpb)
    want = torch.autograd.grad(loss(ref_out, ref_lse), copies, allow_unused=True)
    assert (got[2] is None) == (uses == 'lse') == (want[2] is None)
    for a, e in zip(got, want):
        if e is not None:
            norm = max(1.0, e.abs().max().item())  # relative to the gradient's scale
            torch.testing.assert_close(a.double() / norm, e / norm, atol=tol, rtol=tol)


@pytest.mark.parametrize('case', CASES + [LARGEST_KERNEL], ids=_ids)
def test_unfused_ops_match_reference_fp64(case):
    q, k, v, rpb = make_inputs(case, torch.float64)
    ks, dil = case[5], case[6]
    attn = na2d_qk(q, k, ks, dil, rpb=rpb)
    attn_ref = na2d_qk_reference(q, k, ks, dil, rpb=rpb)
    torch.testing.assert_close(attn, attn_ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(attn)
    assert_close_all(grads(attn, (q, k, rpb), g), grads(attn_ref, (q, k, rpb), g), 1e-10, 1e-10)

    weights = attn_ref.detach().softmax(-1).requires_grad_()
    out = na2d_av(weights, v, ks, dil)
    out_ref = na2d_av_reference(weights, v, ks, dil)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    assert_close_all(grads(out, (weights, v), g), grads(out_ref, (weights, v), g), 1e-10, 1e-10)


# Tolerances relative to the output scale (inputs ~N(0, 1)).
TOLERANCES = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize('dtype', list(TOLERANCES), ids=str)
@pytest.mark.parametrize('case', [CASES[1], CASES[2], CASES[5], CASES[8]], ids=_ids)
def test_reduced_precision(case, dtype):
    tol = TOLERANCES[dtype]
    q, k, v, rpb = make_inputs(case, dtype)
    ks, dil = case[5], case[6]
    out = na2d(q, k, v, ks, dil, rpb=rpb)
    assert out.dtype == dtype
    (q64, k64, v64, rpb64), ref = reference_fp64(
        lambda *t: na2d_reference(*t[:3], ks, dil, rpb=t[3]), q, k, v, rpb)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    got = grads(out, (q, k, v, rpb), g.to(dtype))
    want = grads(ref, (q64, k64, v64, rpb64), g)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        # the rpb gradient sums H*W terms: compare relative to its magnitude
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.double() / scale, e / scale, atol=tol, rtol=tol)

    attn = na2d_qk(q, k, ks, dil, rpb=rpb)
    (_, _, rpb64b), attn_ref = reference_fp64(
        lambda a, b, c: na2d_qk_reference(a, b, ks, dil, rpb=c), q, k, rpb)
    torch.testing.assert_close(attn.double(), attn_ref, atol=tol * 10, rtol=tol)
    weights = attn.detach().float().softmax(-1).to(dtype)
    av = na2d_av(weights, v, ks, dil)
    av_ref = na2d_av_reference(weights.double(), v.detach().double(), ks, dil)
    torch.testing.assert_close(av.double(), av_ref, atol=tol, rtol=tol)


GRADCHECK_CASES = [  # small: gradcheck perturbs every input element
    (1, 1, 7, 7, 3, (3, 3), (1, 1)),
    (1, 2, 7, 9, 2, (3, 5), (2, 1)),
    (2, 1, 9, 8, 2, (3, 3), (3, 2)),
]


@pytest.mark.parametrize('case', GRADCHECK_CASES, ids=_ids)
def test_gradcheck_fp64(case):
    q, k, v, rpb = make_inputs(case, torch.float64)
    ks, dil = case[5], case[6]
    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert check(lambda *t: na2d(*t[:3], ks, dil, rpb=t[3]), (q, k, v, rpb))
    assert check(lambda a, b, c: na2d_qk(a, b, ks, dil, rpb=c), (q, k, rpb))
    weights = torch.randn(*q.shape[:4], ks[0] * ks[1], dtype=torch.float64,
                          requires_grad=True)
    assert check(lambda a, b: na2d_av(a, b, ks, dil), (weights, v))


@pytest.mark.parametrize('case', GRADCHECK_CASES, ids=_ids)
def test_gradgradcheck_fp64(case):
    """Double backward of every op: their backwards are differentiable again (the fused
    op's through the unfused ops)."""
    q, k, v, rpb = make_inputs(case, torch.float64)
    ks, dil = list(case[5]), list(case[6])
    weights = torch.randn(*q.shape[:4], ks[0] * ks[1], dtype=torch.float64,
                          requires_grad=True)
    assert_double_backward(q, k, v, rpb, weights, ks, dil)


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_hessian_vector_product_matches_reference(dtype, tol):
    """A gradient penalty's gradient (d/dx of |dL/dq|^2) equals the reference's."""
    case = CASES[2]
    q, k, v, rpb = make_inputs(case, dtype)
    ks, dil = case[5], case[6]
    g_out = torch.randn(*q.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def penalty_grads(out, inputs, grad_out):
        grad_q, = torch.autograd.grad(out, inputs[0], grad_out, create_graph=True)
        return torch.autograd.grad(grad_q.square().sum(), inputs)

    got = penalty_grads(na2d(q, k, v, ks, dil, rpb=rpb), (q, k, v, rpb), g_out)
    copies, ref = reference_fp64(lambda *t: na2d_reference(*t[:3], ks, dil, rpb=t[3]),
                                 q, k, v, rpb)
    want = penalty_grads(ref, copies, g_out.double())
    assert all(w.abs().max() > 0 for w in want)
    assert_close_all(got, want, tol, tol)


@pytest.mark.parametrize('case', [CASES[2], CASES[5]], ids=_ids)
def test_fused_equals_unfused(case):
    q, k, v, rpb = make_inputs(case, torch.float32)
    ks, dil = case[5], case[6]
    scale = 0.3
    fused = na2d(q, k, v, ks, dil, rpb=rpb, scale=scale)
    unfused = na2d_av(na2d_qk(q * scale, k, ks, dil, rpb=rpb).softmax(-1), v, ks, dil)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(fused)
    assert_close_all(grads(fused, (q, k, v, rpb), g), grads(unfused, (q, k, v, rpb), g),
                     1e-4, 1e-4)


@pytest.mark.parametrize('size', [(7, 7), (9, 5)])
def test_kernel_equal_to_map_is_full_attention(size):
    """With the window covering the whole map, NA is softmax attention with a bias."""
    height, width = size
    q, k, v, rpb = make_inputs((2, 3, height, width, 16, size, (1, 1)), torch.float64)
    out = na2d(q, k, v, size, 1, rpb=rpb)
    # bias of key (ki, kj) for query (qi, qj) is rpb[:, ki - qi + kh - 1, kj - qj + kw - 1]
    qi, qj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
    di = (qi.reshape(-1, 1) - qi.reshape(1, -1)).neg() + height - 1
    dj = (qj.reshape(-1, 1) - qj.reshape(1, -1)).neg() + width - 1
    bias = rpb[:, di, dj]  # [heads, HW, HW]
    flat = lambda t: t.reshape(2, 3, height * width, 16)
    ref = F.scaled_dot_product_attention(flat(q), flat(k), flat(v), attn_mask=bias)
    torch.testing.assert_close(out.reshape_as(ref), ref, atol=1e-10, rtol=1e-10)


def test_non_contiguous_inputs():
    case = CASES[5]
    q, k, v, rpb = make_inputs(case, torch.float32)
    ks, dil = case[5], case[6]
    # same values, other memory layouts
    qn = q.detach().transpose(2, 3).contiguous().transpose(2, 3)
    kn = torch.cat([k.detach(), k.detach()], dim=-1)[..., : k.shape[-1]]
    vn = v.detach().permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    torch.testing.assert_close(na2d(qn, kn, vn, ks, dil, rpb=rpb), na2d(q, k, v, ks, dil, rpb=rpb))
    torch.testing.assert_close(na2d_qk(qn, kn, ks, dil), na2d_qk(q, k, ks, dil))
    attn = torch.randn(*q.shape[:4], ks[0] * ks[1])
    torch.testing.assert_close(na2d_av(attn.transpose(2, 3).contiguous().transpose(2, 3), vn,
                                       ks, dil), na2d_av(attn, v, ks, dil))


def test_views_are_read_in_place_and_saved_contiguous():
    """The CPU kernels read NAT's q/k/v views (out of its qkv projection) without copies;
    maps autograd saves for the backward, and maps for other devices, are contiguous."""
    def qkv_views(packed):
        return packed.permute(3, 0, 4, 1, 2, 5).unbind(0)

    q, k, v = qkv_views(torch.randn(1, 9, 9, 3, 2, 8))
    assert kernel_layout(q) is q
    assert kernel_layout(q, saved_for_backward=True).is_contiguous()
    on_meta = torch.empty_strided(q.shape, q.stride(), device='meta')
    assert kernel_layout(on_meta).is_contiguous()
    packed = torch.randn(1, 9, 9, 3, 2, 8, requires_grad=True)
    q, k, v = qkv_views(packed)
    out = na2d(q, k, v, 3)
    assert all(t.is_contiguous() for t in out.grad_fn.saved_tensors[:3])
    grad_out = torch.randn(1, 9, 9, 2, 8).permute(0, 3, 1, 2, 4)  # heads-last, read in place
    grads = torch.autograd.grad(out, packed, grad_out)[0]
    dense = packed.detach().clone().requires_grad_()
    qd, kd, vd = (t.contiguous() for t in qkv_views(dense))
    want = torch.autograd.grad(na2d(qd, kd, vd, 3), dense, grad_out.contiguous())[0]
    assert torch.equal(grads, want)


def test_rpb_grad_deterministic_across_threads():
    case = (2, 3, 24, 30, 16, (7, 7), (2, 1))
    q, k, v, rpb = make_inputs(case, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            out = na2d(q, k, v, case[5], case[6], rpb=rpb)
            results.append(torch.autograd.grad(out.square().sum(), (q, k, v, rpb)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_opcheck_every_op():
    case = CASES[1]
    ks, dil = list(case[5]), list(case[6])
    q, k, v, rpb = make_inputs(case, torch.float32)
    weights = torch.randn(*q.shape[:4], ks[0] * ks[1], requires_grad=True)
    samples = opcheck_samples(q, k, v, rpb, weights, torch.randn_like(v), ks, dil)
    for name, args in samples.items():
        torch.library.opcheck(op(name), args)
    # the fused backward's sample passes grad_lse; na2d's backward passes none
    torch.library.opcheck(op('na2d_fused_backward'), samples['na2d_fused_backward'][:-1])


def test_compile_fullgraph_forward_and_backward():
    case = CASES[5]
    q, k, v, rpb = make_inputs(case, torch.float32)
    ks, dil = case[5], case[6]

    def block(q, k, v, rpb):
        return (na2d(q, k, v, ks, dil, rpb=rpb) * 2).sum() + na2d_qk(q, k, ks, dil).sum()

    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    eager_loss = block(q, k, v, rpb)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v, rpb))
    loss = compiled(q, k, v, rpb)
    torch.testing.assert_close(loss, eager_loss)
    assert_close_all(torch.autograd.grad(loss, (q, k, v, rpb)), eager_grads, 1e-5, 1e-5)


@pytest.mark.parametrize('region', ['na2d', 'na2d_fused returning lse'])
def test_compiled_backward_runs_the_fused_backward_kernel(region):
    """A compiled training step keeps the fused backward kernel (the differentiable
    composite is only for create_graph=True backwards), also where the region returns
    lse, which AOT then gives a gradient (zeros when unused)."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from functorch.compile import make_boxed_func

    ops_in = {}

    def backend(gm, example_inputs):
        def compiler(kind):
            def compile_graph(graph, _):
                ops_in[kind] = {str(n.target) for n in graph.graph.nodes
                                if str(n.target).startswith('nat_mm.')}
                return make_boxed_func(graph.forward)
            return compile_graph
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler('fw'),
                                     bw_compiler=compiler('bw'))

    case = CASES[1]
    q, k, v, rpb = make_inputs(case, torch.float32)
    ks, dil = case[5], case[6]
    if region == 'na2d':
        step = torch.compile(lambda *t: na2d(*t[:3], ks, dil, rpb=t[3]).square().sum(),
                             backend=backend, fullgraph=True)
        loss = step(q, k, v, rpb)
    else:
        attend = torch.compile(lambda *t: _fused_with_lse(*t, ks, dil, 0.3), backend=backend,
                               fullgraph=True)
        out, lse = attend(q, k, v, rpb)
        loss = out.square().sum() + lse.sum()
        eager_out, eager_lse = _fused_with_lse(q, k, v, rpb, ks, dil, 0.3)
        eager_grads = torch.autograd.grad(eager_out.square().sum() + eager_lse.sum(),
                                          (q, k, v, rpb))
    got = torch.autograd.grad(loss, (q, k, v, rpb))
    assert ops_in == {'fw': {'nat_mm.na2d_fused.default'},
                      'bw': {'nat_mm.na2d_fused_backward.default'}}
    if region != 'na2d':
        assert_close_all(got, eager_grads, 1e-5, 1e-5)


def test_backend_info_reports_cpu_kernels():
    info = backend_info()
    assert info['cpu'] in ('compiled', 'reference')
    assert info['cpu'] == ('compiled' if info['extension'] else 'reference')


@pytest.mark.parametrize('case', [CASES[1], CASES[2]], ids=_ids)
def test_reference_fallback_kernels(case):
    """The kernels that serve a device without compiled ones are exact too."""
    q, k, v, rpb = make_inputs(case, torch.float64)
    ks, dil = list(case[5]), list(case[6])
    qd, kd, vd, rd = (t.detach() for t in (q, k, v, rpb))
    compiled = [op('na2d_fused')(qd, kd, vd, rd, ks, dil, 0.4)]
    out, lse = compiled[0]
    g, g_lse = torch.randn_like(out), torch.randn_like(lse)
    expected = [fallback._fused(qd, kd, vd, rd, ks, dil, 0.4)]
    for grad_lse in (None, g_lse):
        args = (g, qd, kd, vd, rd, out, lse, ks, dil, 0.4, grad_lse)
        compiled.append(op('na2d_fused_backward')(*args))
        expected.append(fallback._fused_backward(*args))
    for got, want in zip(compiled, expected):
        assert_close_all(got, want, 1e-10, 1e-10)


def test_install_without_the_extension_passes_opcheck_and_compiles():
    """Without the compiled extension (not built, or built against another torch) the
    pure-PyTorch kernels serve every op; opcheck holds them to the fake kernels (strides
    included: inductor asserts them, and the fallback's used to differ), and a compiled
    forward+backward matches eager. Run in a fresh interpreter with nat_mm._C blocked."""
    tests = [f'tests/test_ops.py::{name}' for name in (
        'test_opcheck_every_op', 'test_compile_fullgraph_forward_and_backward')]
    code = ("import sys; sys.modules['nat_mm._C'] = None\n"
            "import warnings; warnings.simplefilter('ignore', RuntimeWarning)\n"
            "from nat_mm.ops import backend_info\n"
            "assert backend_info()['cpu'] == 'reference', backend_info()\n"
            "import pytest\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{tests!r}]))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert '2 passed' in result.stdout
