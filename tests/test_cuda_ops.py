"""The CUDA kernels of nat_mm against the pure-PyTorch reference (float64, on the CPU).

Every op, forward and every gradient, float32/float16/bfloat16/float64, borders, dilation,
rectangular and large kernels, odd sizes and head dims; the three CUDA code paths of the
fused ops (the default: the tiled kernels where they apply;
with NAT_MM_CUDA_TENSOR_CORES=1 the tensor-core forward and backward query side; with
NAT_MM_CUDA_FORCE_SIMPLE=1 the straightforward kernels);
bad inputs raising Python errors; deterministic gradients; streams and devices.

Needs a CUDA GPU and an extension built with the CUDA kernels; every test skips cleanly
otherwise. ``tools/gpu_check.sh`` builds the extension and runs this file on a lent GPU.
"""
import functools

import pytest
import torch

from bad_op_calls import IDS, bad_calls
from op_samples import assert_double_backward, opcheck_samples
from nat_mm.ops import backend_info, na2d, na2d_av, na2d_qk
from nat_mm.ops.library import op
from nat_mm.ops.reference import (na2d_av_reference, na2d_qk_reference, na2d_reference)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

FORCE_SIMPLE = 'NAT_MM_CUDA_FORCE_SIMPLE'
TENSOR_CORES = 'NAT_MM_CUDA_TENSOR_CORES'

# (batch, heads, H, W, head_dim, kernel_size, dilation)
CASES = [
    (1, 1, 7, 7, 4, (3, 3), (1, 1)),          # smallest map, border everywhere
    (2, 2, 9, 11, 8, (3, 5), (2, 1)),         # rectangular kernel, dilation on one axis
    (1, 2, 13, 15, 33, (5, 3), (2, 3)),       # odd head dim, both axes dilated
    (2, 1, 14, 12, 16, (7, 7), (2, 1)),       # H == k*d exactly
    (2, 2, 28, 28, 32, (7, 7), (1, 1)),       # NAT stage-2-like
    (1, 2, 56, 48, 32, (7, 7), (4, 6)),       # DiNAT-like dilation
    (1, 2, 20, 24, 64, (9, 13), (2, 1)),
    (1, 1, 16, 17, 100, (11, 13), (1, 1)),    # head dim > 64 (8 threads per query)
    (1, 1, 11, 10, 160, (5, 3), (1, 2)),      # head dim > 128 (16 threads per query)
    (1, 1, 9, 9, 300, (3, 3), (1, 1)),        # head dim > 256: simple kernels only
    (1, 1, 13, 13, 8, (13, 13), (1, 1)),      # kernel == map
    (1, 2, 17, 19, 8, (3, 3), (4, 4)),        # dilation 4
    (1, 1, 33, 31, 8, (31, 31), (1, 1)),      # k = 31
    (1, 1, 35, 37, 32, (31, 31), (1, 1)),     # k = 31 at head dim 32 (tiles shrink)
]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = list(TOL)


def _ids(case):
    return 'B{}h{}_{}x{}_D{}_k{}x{}_d{}x{}'.format(*case[:5], *case[5], *case[6])


def _representable(x):
    """Values exactly representable in float16, bfloat16, float32 and float64, so one
    float64 reference serves every dtype."""
    x = x.to(torch.bfloat16).double()
    return torch.where(x.abs() < 2.0 ** -10, torch.zeros_like(x), x)


@functools.lru_cache(maxsize=None)
def _base(case, with_rpb, seed=0):
    batch, heads, height, width, dim, ks, _ = case
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: _representable(torch.randn(*s, generator=gen, dtype=torch.float64))
    q, k, v, g = (rand(batch, heads, height, width, dim) for _ in range(4))
    rpb = rand(heads, 2 * ks[0] - 1, 2 * ks[1] - 1) if with_rpb else None
    return q, k, v, rpb, g


def grad_lse_for(case):
    """A gradient of lse [B, heads, H, W] (float64, representable in bfloat16)."""
    gen = torch.Generator().manual_seed(1)
    return _representable(torch.randn(*case[:4], generator=gen, dtype=torch.float64))


@functools.lru_cache(maxsize=None)
def _fused_reference(case, with_rpb, scale, with_grad_lse=False):
    """Forward, lse and (q, k, v, rpb) gradients of the reference, float64 on the CPU; the
    gradients are of out . g, plus lse . grad_lse_for(case) with `with_grad_lse`."""
    q, k, v, rpb, g = _base(case, with_rpb)
    ks, dil = case[5], case[6]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    rpb_leaf = rpb.clone().requires_grad_() if rpb is not None else None
    out = na2d_reference(*leaves, ks, dil, rpb=rpb_leaf, scale=scale)
    lse = na2d_qk_reference(leaves[0] * scale, leaves[1], ks, dil, rpb_leaf).logsumexp(-1)
    wanted = leaves + ([rpb_leaf] if rpb_leaf is not None else [])
    outputs, grads_out = ([out, lse], [g, grad_lse_for(case)]) if with_grad_lse else (out, g)
    grads = torch.autograd.grad(outputs, wanted, grads_out)
    return out.detach(), lse.detach(), grads


def _cuda(t, dtype, grad=False):
    if t is None:
        return None
    return t.to('cuda', dtype).requires_grad_(grad)


def assert_scaled_close(actual, expected, tol, what=''):
    """max |actual - expected| <= tol * max(1, max |expected|) (error relative to scale)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f'{what}: non-finite values'
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale, f'{what}: max error {err:.3g} > {tol:g} * scale {scale:.3g}'


def select_path(path, setenv, delenv):
    """Sets the switches of one kernel path ('default', 'tensor-cores' or 'simple') with
    setenv(name, value) / delenv(name)."""
    delenv(FORCE_SIMPLE)
    delenv(TENSOR_CORES)
    if path == 'simple':
        setenv(FORCE_SIMPLE, '1')
    elif path == 'tensor-cores':
        setenv(TENSOR_CORES, '1')


@pytest.fixture(params=['default', 'tensor-cores', 'simple'])
def path(request, monkeypatch):
    """Run a test on the default kernels (tiled where they apply), with the opt-in
    tensor-core kernels, and on the simple kernels."""
    select_path(request.param, monkeypatch.setenv,
                lambda name: monkeypatch.delenv(name, raising=False))
    return request.param


def test_extension_serves_cuda():
    info = backend_info()
    assert info['extension'], info
    assert info.get('cuda_kernels') is True, info
    assert info['cuda'] == 'compiled', info


# ---------------------------------------------------------------- fused op
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=_ids)
def test_fused_forward_backward(case, dtype, path):
    with_rpb = CASES.index(case) % 4 != 3  # most cases with rpb, every fourth without
    ks, dil = case[5], case[6]
    scale = case[4] ** -0.5
    q, k, v, rpb, g = _base(case, with_rpb)
    out_ref, lse_ref, grads_ref = _fused_reference(case, with_rpb, scale)
    tol = TOL[dtype]
    qc, kc, vc = (_cuda(t, dtype, True) for t in (q, k, v))
    rc = _cuda(rpb, dtype, True)
    out = na2d(qc, kc, vc, ks, dil, rpb=rc)
    assert out.dtype == dtype and out.device.type == 'cuda'
    assert_scaled_close(out, out_ref, tol, 'out')
    inputs = [qc, kc, vc] + ([rc] if rc is not None else [])
    got = torch.autograd.grad(out, inputs, _cuda(g, dtype))
    for name, a, e in zip(('grad_q', 'grad_k', 'grad_v', 'grad_rpb'), got, grads_ref):
        assert a.dtype == dtype
        assert_scaled_close(a, e, tol, name)
    # lse straight from the op: float32 (float64 for float64 input)
    _, lse = op('na2d_fused')(qc.detach(), kc.detach(), vc.detach(),
                              None if rc is None else rc.detach(), list(ks), list(dil), scale)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_scaled_close(lse, lse_ref, tol, 'lse')


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', [CASES[3], CASES[4], CASES[5], CASES[6]], ids=_ids)
def test_tensor_core_kernels_are_separate_kernels(case, dtype, monkeypatch):
    """At head dims 16/32/64 in float16/bfloat16, NAT_MM_CUDA_TENSOR_CORES=1 routes the
    forward and both sides of the backward to the tensor-core kernels. They round the
    probabilities (forward), ds (query side) and p and ds (key side) to the input dtype for
    their second GEMM, so out and the q/k/v gradients are close to the CUDA-core kernels'
    but not bit-identical (identical would mean they did not run). (Which kernels run is
    asserted by name in the CPU emulation, tests/test_cuda_emulation.py.)"""
    ks, dil = list(case[5]), list(case[6])
    scale = case[4] ** -0.5
    q, k, v, rpb, g = _base(case, True)
    out_ref, lse_ref, grads_ref = _fused_reference(case, True, scale)
    args = [_cuda(t, dtype) for t in (q, k, v, rpb)]
    go = _cuda(g, dtype)
    results = {}
    for name, flag in (('tensor cores', '1'), ('cuda cores', '0')):
        monkeypatch.setenv(TENSOR_CORES, flag)
        out, lse = op('na2d_fused')(*args, ks, dil, scale)
        grads = op('na2d_fused_backward')(go, *args[:3], args[3], out, lse, ks, dil, scale)
        assert_scaled_close(out, out_ref, TOL[dtype], f'out ({name})')
        assert_scaled_close(lse, lse_ref, TOL[dtype], f'lse ({name})')
        for what, a, e in zip(('grad_q', 'grad_k', 'grad_v', 'grad_rpb'), grads, grads_ref):
            assert_scaled_close(a, e, TOL[dtype], f'{what} ({name})')
        results[name] = (out, *grads[:3])
    for what, a, b in zip(('out', 'grad_q', 'grad_k', 'grad_v'), results['tensor cores'],
                          results['cuda cores']):
        assert not torch.equal(a, b), f'{what}: the tensor-core kernels did not run'


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', [CASES[0], CASES[1], CASES[3]], ids=_ids)
def test_fused_backward_takes_the_lse_gradient(case, dtype, path):
    """grad_lse (lse's own gradient, na2d_fused called directly) joins out's in the
    fused backward kernels: ds = p (grad_out . v - grad_out . out + grad_lse)."""
    ks, dil, scale = list(case[5]), list(case[6]), 0.3
    q, k, v, rpb, g = _base(case, True)
    _, _, grads_ref = _fused_reference(case, True, scale, with_grad_lse=True)
    args = [_cuda(t, dtype) for t in (q, k, v, rpb)]
    out, lse = op('na2d_fused')(*args, ks, dil, scale)
    grads = op('na2d_fused_backward')(_cuda(g, dtype), *args, out, lse, ks, dil, scale,
                                      grad_lse_for(case).to('cuda', lse.dtype))
    for what, a, e in zip(('grad_q', 'grad_k', 'grad_v', 'grad_rpb'), grads, grads_ref):
        assert_scaled_close(a, e, TOL[dtype], what)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_fused_backward_op_without_rpb_returns_rpb_grad(dtype, path):
    """na2d_fused_backward always returns grad_rpb [heads, 2kh-1, 2kw-1] (zero bias)."""
    case = CASES[1]
    ks, dil = list(case[5]), list(case[6])
    q, k, v, rpb, g = _base(case, True)
    qc, kc, vc, gc = (_cuda(t, dtype) for t in (q, k, v, g))
    zero = torch.zeros_like(_cuda(rpb, dtype))
    out, lse = op('na2d_fused')(qc, kc, vc, None, ks, dil, 0.5)
    grads = op('na2d_fused_backward')(gc, qc, kc, vc, None, out, lse, ks, dil, 0.5)
    out0, lse0 = op('na2d_fused')(qc, kc, vc, zero, ks, dil, 0.5)
    grads0 = op('na2d_fused_backward')(gc, qc, kc, vc, zero, out0, lse0, ks, dil, 0.5)
    assert grads[3].shape == (case[1], 2 * ks[0] - 1, 2 * ks[1] - 1)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- unfused ops
@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=_ids)
def test_unfused_ops(case, dtype):
    ks, dil = case[5], case[6]
    q, k, v, rpb, g = _base(case, True)
    tol = TOL[dtype]
    # qk (+ rpb) and its gradients: q (via av), k (via inverse), rpb (via rpb_grad)
    leaves = [t.clone().requires_grad_() for t in (q, k, rpb)]
    attn_ref = na2d_qk_reference(leaves[0], leaves[1], ks, dil, leaves[2])
    g_attn = _representable(torch.randn(attn_ref.shape, dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(1)))
    grads_ref = torch.autograd.grad(attn_ref, leaves, g_attn)
    qc, kc, rc = (_cuda(t, dtype, True) for t in (q, k, rpb))
    attn = na2d_qk(qc, kc, ks, dil, rpb=rc)
    assert attn.dtype == dtype
    assert_scaled_close(attn, attn_ref, tol, 'attn')
    got = torch.autograd.grad(attn, (qc, kc, rc), _cuda(g_attn, dtype))
    for name, a, e in zip(('grad_q', 'grad_k', 'grad_rpb'), got, grads_ref):
        assert_scaled_close(a, e, tol, name)
    # av and its gradients: attn (via qk), value (via inverse)
    weights = _representable(attn_ref.detach().softmax(-1))
    leaves = [weights.clone().requires_grad_(), v.clone().requires_grad_()]
    av_ref = na2d_av_reference(*leaves, ks, dil)
    grads_ref = torch.autograd.grad(av_ref, leaves, g)
    wc, vc = _cuda(weights, dtype, True), _cuda(v, dtype, True)
    av = na2d_av(wc, vc, ks, dil)
    assert av.dtype == dtype
    assert_scaled_close(av, av_ref, tol, 'av')
    got = torch.autograd.grad(av, (wc, vc), _cuda(g, dtype))
    for name, a, e in zip(('grad_attn', 'grad_value'), got, grads_ref):
        assert_scaled_close(a, e, tol, name)


@pytest.mark.parametrize('case', [CASES[1], CASES[2], CASES[5]], ids=_ids)
def test_every_op_matches_cpu_kernels(case):
    """Same float64 inputs on CPU (compiled or reference kernels) and CUDA, op by op."""
    ks, dil = list(case[5]), list(case[6])
    q, k, v, rpb, g = _base(case, True)
    w = torch.randn(*q.shape[:4], ks[0] * ks[1], dtype=torch.float64)
    out, lse = op('na2d_fused')(q, k, v, rpb, ks, dil, 0.3)
    calls = {
        'na2d_qk': (q, k, rpb, ks, dil),
        'na2d_av': (w, v, ks, dil),
        'na2d_inverse': (w, q, ks, dil),
        'na2d_rpb_grad': (w, ks, dil),
        'na2d_fused': (q, k, v, rpb, ks, dil, 0.3),
        'na2d_fused_backward': (g, q, k, v, rpb, out, lse, ks, dil, 0.3),
    }
    for name, args in calls.items():
        cpu = op(name)(*args)
        gpu = op(name)(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        cpu = cpu if isinstance(cpu, tuple) else (cpu,)
        gpu = gpu if isinstance(gpu, tuple) else (gpu,)
        for a, b in zip(gpu, cpu):
            assert_scaled_close(a, b, 1e-9, name)


@pytest.mark.parametrize('case', [CASES[0], (1, 1, 8, 9, 3, (3, 3), (2, 2))], ids=_ids)
def test_gradcheck_fp64(case, path):
    ks, dil = case[5], case[6]
    q, k, v, rpb, _ = _base(case, True)
    q, k, v, rpb = (_cuda(t, torch.float64, True) for t in (q, k, v, rpb))
    assert torch.autograd.gradcheck(lambda *t: na2d(*t[:3], ks, dil, rpb=t[3]), (q, k, v, rpb))
    assert torch.autograd.gradcheck(lambda a, b, c: na2d_qk(a, b, ks, dil, rpb=c), (q, k, rpb))
    weights = torch.randn(*q.shape[:4], ks[0] * ks[1], dtype=torch.float64, device='cuda',
                          requires_grad=True)
    assert_double_backward(q, k, v, rpb, weights, list(ks), list(dil))


def test_opcheck_every_op_cuda():
    case = CASES[1]
    ks, dil = list(case[5]), list(case[6])
    q, k, v, rpb, g = (_cuda(t, torch.float32, True) for t in _base(case, True))
    weights = torch.randn(*q.shape[:4], ks[0] * ks[1], device='cuda', requires_grad=True)
    for name, args in opcheck_samples(q, k, v, rpb, weights, g, ks, dil).items():
        torch.library.opcheck(op(name), args)


def test_non_contiguous_inputs():
    case = CASES[6]
    ks, dil = case[5], case[6]
    q, k, v, rpb, _ = (_cuda(t, torch.float32) for t in _base(case, True))
    qn = q.transpose(2, 3).contiguous().transpose(2, 3)
    kn = torch.cat([k, k], dim=-1)[..., : k.shape[-1]]
    vn = v.permute(4, 0, 1, 2, 3).contiguous().permute(1, 2, 3, 4, 0)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    torch.testing.assert_close(na2d(qn, kn, vn, ks, dil, rpb=rpb), na2d(q, k, v, ks, dil, rpb=rpb))
    torch.testing.assert_close(na2d_qk(qn, kn, ks, dil), na2d_qk(q, k, ks, dil))


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gradients_bitwise_deterministic(dtype, path):
    case = (2, 3, 40, 44, 32, (7, 7), (2, 1))
    ks, dil = case[5], case[6]
    q, k, v, rpb, g = (_cuda(t, dtype, True) for t in _base(case, True))
    runs = []
    for _ in range(3):
        out = na2d(q, k, v, ks, dil, rpb=rpb)
        fused = torch.autograd.grad(out, (q, k, v, rpb), g)
        attn = na2d_qk(q, k, ks, dil, rpb=rpb)
        unfused = torch.autograd.grad(attn, (q, k, rpb), attn.detach().sin())
        rpb_grad = op('na2d_rpb_grad')(attn.detach(), list(ks), list(dil))
        runs.append((out, *fused, *unfused, rpb_grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- streams and devices
def test_runs_on_current_stream(path):
    """Inputs written on a side stream after a long sleep: a kernel launched on any other
    stream would read them before they exist."""
    case = CASES[4]
    ks, dil = case[5], case[6]
    q, k, v, rpb, _ = (_cuda(t, torch.float32) for t in _base(case, True))
    expected = na2d(q, k, v, ks, dil, rpb=rpb)
    expected_attn = na2d_qk(q, k, ks, dil, rpb=rpb)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of spinning on the side stream
        q2, k2, v2 = q * 1, k * 1, v * 1
        out = na2d(q2, k2, v2, ks, dil, rpb=rpb)
        attn = na2d_qk(q2, k2, ks, dil, rpb=rpb)
    side.synchronize()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(attn, expected_attn, atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_device_guard_second_gpu():
    case = CASES[4]
    ks, dil = case[5], case[6]
    q, k, v, rpb, _ = _base(case, True)
    expected = na2d(*(_cuda(t, torch.float32) for t in (q, k, v)), ks, dil,
                    rpb=_cuda(rpb, torch.float32))
    with torch.cuda.device(0):
        on1 = [t.to('cuda:1', torch.float32) for t in (q, k, v, rpb)]
        out = na2d(*on1[:3], ks, dil, rpb=on1[3])
    assert out.device == torch.device('cuda:1')
    torch.testing.assert_close(out.cpu(), expected.cpu())


def test_explicit_device_index_zero():
    case = CASES[0]
    ks, dil = case[5], case[6]
    q, k, v, rpb, _ = (t.to('cuda:0', torch.float32) for t in _base(case, True))
    with torch.cuda.device(0):
        out = na2d(q, k, v, ks, dil, rpb=rpb)
    assert out.device == torch.device('cuda:0')


# ---------------------------------------------------------------- bad inputs
def _small(dtype=torch.float32, device='cuda'):
    return torch.randn(1, 2, 9, 9, 8, device=device, dtype=dtype)


def test_python_validation_errors_on_cuda():
    q = _small()
    with pytest.raises(ValueError, match='kernel_size'):
        na2d(q, q, q, 4)
    with pytest.raises(ValueError, match='smaller than kernel_size'):
        na2d(q, q, q, 5, 2)
    with pytest.raises(ValueError, match='device'):
        na2d(q, q.cpu(), q, 3)
    with pytest.raises(TypeError, match='dtype'):
        na2d(q, q.half(), q, 3)
    with pytest.raises(ValueError, match='rpb'):
        na2d(q, q, q, 3, rpb=torch.zeros(2, 3, 3, device='cuda'))
    with pytest.raises(ValueError, match='attn'):
        na2d_av(torch.randn(1, 2, 9, 9, 8, device='cuda'), q, 3)
    torch.cuda.synchronize()  # no asynchronous error left behind


# One test per call, so that a crash names the call (an H200 run of the combined test lost
# its pytest worker to a host segfault in one of them, without saying which).
@pytest.mark.parametrize('index', range(len(IDS)), ids=IDS)
def test_kernels_check_their_inputs(index):
    """Calling the registered ops directly (no Python validation) raises, never faults."""
    _, name, build, match, error = bad_calls('cuda')[index]
    q = _small()
    with pytest.raises(error, match=match):
        op(name)(*build(q))
    torch.cuda.synchronize()
    # the device is still healthy
    assert torch.isfinite(na2d(q, q, q, 3)).all()


def test_kernels_check_the_device_of_every_input():
    q = _small()
    with pytest.raises(ValueError, match='key is on cpu'):
        op('na2d_qk')(q, q.cpu(), None, [3, 3], [1, 1])
    with pytest.raises(ValueError, match='rpb is on cpu'):
        op('na2d_fused')(q, q, q, torch.zeros(2, 5, 5), [3, 3], [1, 1], 1.0)


def test_empty_batch():
    q = torch.randn(0, 2, 9, 9, 8, device='cuda', requires_grad=True)
    out = na2d(q, q, q, 3)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape
    rpb_grad = op('na2d_fused_backward')(q.detach(), q.detach(), q.detach(), q.detach(), None,
                                         q.detach(), torch.zeros(0, 2, 9, 9, device='cuda'),
                                         [3, 3], [1, 1], 1.0)[3]
    assert rpb_grad.shape == (2, 5, 5) and not rpb_grad.any()


# ---------------------------------------------------------------- 64-bit indexing
@pytest.mark.slow
def test_int64_indexing_large_tensors():
    """Attention maps and q/k/v past 2**31 elements; each batch entry is independent, so the
    last one must equal the same problem run on its own."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2 ** 30:
        pytest.skip('needs 40 GiB of free GPU memory')
    torch.manual_seed(0)
    # unfused ops over a map of 180_000 * 256 * 49 > 2**31 elements
    q = torch.randn(180_000, 1, 16, 16, 2, device='cuda', dtype=torch.float16)
    attn = na2d_qk(q, q, 7)
    assert attn.numel() > 2 ** 31
    torch.testing.assert_close(attn[-1:], na2d_qk(q[-1:], q[-1:], 7))
    for name in ('na2d_av', 'na2d_inverse'):
        big = op(name)(attn, q, [7, 7], [1, 1])
        torch.testing.assert_close(big[-1:], op(name)(attn[-1:], q[-1:], [7, 7], [1, 1]))
    del attn, big
    ones = torch.ones(180_000, 1, 16, 16, 49, device='cuda')
    rpb_grad = op('na2d_rpb_grad')(ones, [7, 7], [1, 1]).double()
    expected = op('na2d_rpb_grad')(ones[:1], [7, 7], [1, 1]).double() * ones.shape[0]
    # float32 partial sums of up to 4.6e7 over 1024 chunks: each add rounds by <= 2 (ulp/2),
    # so the sum may be off by ~5e-5 relative (measured on an H200: 1.5e-5)
    torch.testing.assert_close(rpb_grad, expected, rtol=1e-4, atol=0)
    del ones, q
    # fused: q numel = 66 * 1 * 1024 * 1024 * 32 > 2**31
    q = torch.randn(66, 1, 1024, 1024, 32, device='cuda', dtype=torch.bfloat16)
    assert q.numel() > 2 ** 31
    out = na2d(q, q, q, 7)
    torch.testing.assert_close(out[-1:], na2d(q[-1:], q[-1:], q[-1:], 7))
    del out, q
    torch.cuda.empty_cache()
