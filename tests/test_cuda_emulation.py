"""The CUDA kernels, run without a GPU: the sources under csrc/cuda/ compiled for the CPU
emulation of csrc/emulation/ (see its header for what it models and checks) and compared
with the float64 reference.

Every kernel of every path: the straightforward kernels (NAT_MM_CUDA_FORCE_SIMPLE=1), the
tiled ones (the default path) and the tensor-core (wmma) ones (NAT_MM_CUDA_TENSOR_CORES=1);
forward and every gradient, float32/float16/bfloat16 (and float64), borders, dilation,
rectangular kernels, odd head dims; inputs inside NaN margins (a read past a tensor
shows); the threads of each block also in reverse order and shared memory poisoned with
huge values instead of NaN (a missing barrier then shows). Each test checks which kernels
ran, so a fallback to another path fails it. The emulation's own checks are tested on
faulty kernels (csrc/emulation/emulation_selftest.cpp). Marked slow: random shapes, and
the kernels in an AddressSanitizer build on exact-size tensors.

What it cannot show: timing, the hardware's memory model beyond the barriers above, and
anything of nvcc itself (tests/test_cuda_compile.py compiles the same sources with nvcc;
tests/test_cuda_ops.py runs them on a GPU).
"""
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from bad_op_calls import IDS, bad_calls
from cuda_emulation import asan_runtime, emulated_ops, unavailable_reason
from nat_mm.ops.reference import na2d_av_reference, na2d_qk_reference
# the GPU tests' inputs, tolerances and path fixture (default / tensor-cores / simple)
from test_cuda_ops import (FORCE_SIMPLE, TOL, _base, _fused_reference,  # noqa: F401
                           _representable, assert_scaled_close, grad_lse_for, path,
                           select_path)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=unavailable_reason() or '')

ORDER = 'NAT_MM_EMULATION_ORDER'
POISON = 'NAT_MM_EMULATION_POISON'
MMA_DIMS = (16, 32, 64, 128)  # head dims of the tensor-core kernels

# (batch, heads, H, W, head_dim, kernel_size, dilation)
CASES = [
    (1, 1, 7, 7, 4, (3, 3), (1, 1)),          # smallest map, border everywhere
    (2, 2, 9, 11, 8, (3, 5), (2, 1)),         # rectangular kernel, dilation on one axis
    (1, 2, 13, 15, 32, (7, 7), (1, 1)),       # NAT-like
    (1, 2, 17, 19, 16, (5, 3), (2, 3)),       # both axes dilated
    (1, 1, 20, 24, 64, (9, 13), (2, 1)),
    (1, 1, 11, 10, 33, (5, 3), (1, 2)),       # odd head dim
    (1, 1, 12, 9, 128, (3, 3), (1, 1)),
    (1, 1, 13, 13, 16, (13, 13), (1, 1)),     # kernel == map
]
# Larger, in float16 only (seconds each here): more threads per query for head dims past
# 64 and 128, the simple kernels past 256, DiNAT-like dilation.
LARGE_CASES = [
    (1, 1, 16, 17, 100, (11, 13), (1, 1)),
    (1, 1, 11, 10, 160, (5, 3), (1, 2)),
    (1, 1, 9, 9, 300, (3, 3), (1, 1)),
    (1, 2, 56, 48, 32, (7, 7), (4, 6)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PAD = 64


def _ids(case):
    return 'B{}h{}_{}x{}_D{}_k{}x{}_d{}x{}'.format(*case[:5], *case[5], *case[6])


@pytest.fixture(scope='module')
def ops():
    return emulated_ops()


def _launched(ops):
    """Short names (template arguments dropped) of the kernels launched since the last call."""
    return [re.sub(r'<.*$', '', full).rsplit('::', 1)[-1] for full in ops.launched_kernels()]


def _fused_kernels(path, dtype, dim):
    """The kernels the fused forward and backward must run on this path."""
    if path == 'simple' or dtype == torch.float64 or dim > 256:
        return ['qk_kernel', 'softmax_lse_kernel', 'av_kernel'], ['bwd_scores_kernel',
                                                                   'inverse_kernel']
    if path == 'tensor-cores' and dtype != torch.float32 and dim in MMA_DIMS:
        return ['fused_fwd_mma_kernel'], ['fused_bwd_mma_kernel', 'fused_bwd_keys_mma_kernel']
    return ['fused_fwd_tiled_kernel'], ['fused_bwd_tiled_kernel', 'fused_bwd_keys_tiled_kernel']


def _padded(t, dtype):
    """t in `dtype` as a view into a buffer with NaN on both sides: a read past either end
    of the tensor turns the result NaN. 64 elements keep the view 128-byte aligned."""
    buf = torch.full((t.numel() + 2 * PAD,), float('nan'), dtype=dtype)
    view = buf[PAD:PAD + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _as_input(t, dtype, padded):
    """t in `dtype`: inside NaN margins (_padded), or else in an allocation of its own size
    (AddressSanitizer then sees any overrun)."""
    if t is None:
        return None
    return _padded(t, dtype) if padded else t.to(dtype).clone()


def _check_fused(ops, case, dtype, path, with_rpb=True, padded=True, check_kernels=True,
                 with_grad_lse=False):
    """Forward and backward (with lse's gradient too, with_grad_lse) of the emulated kernels
    against the float64 reference, and which kernels ran."""
    q, k, v, rpb, g = _base(case, with_rpb)
    ks, dil, scale = list(case[5]), list(case[6]), case[4] ** -0.5
    ref, ref_lse, ref_grads = _fused_reference(case, with_rpb, scale, with_grad_lse)

    cast = lambda t: _as_input(t, dtype, padded)
    _launched(ops)
    out, lse = ops.na2d_fused(cast(q), cast(k), cast(v), cast(rpb), ks, dil, scale)
    fwd = _launched(ops)
    grad_lse = _as_input(grad_lse_for(case), lse.dtype, padded) if with_grad_lse else None
    grads = ops.na2d_fused_backward(cast(g), cast(q), cast(k), cast(v), cast(rpb), out, lse,
                                    ks, dil, scale, grad_lse)
    bwd = _launched(ops)

    if check_kernels:
        want_fwd, want_bwd = _fused_kernels(path, dtype, case[4])
        assert all(name in fwd for name in want_fwd), f'forward ran {fwd}, not {want_fwd}'
        assert all(name in bwd for name in want_bwd), f'backward ran {bwd}, not {want_bwd}'
    assert_scaled_close(out, ref, TOL[dtype], 'out')
    assert_scaled_close(lse, ref_lse, TOL[dtype], 'lse')
    for name, got, want in zip(('grad_q', 'grad_k', 'grad_v', 'grad_rpb'), grads, ref_grads):
        assert_scaled_close(got, want, TOL[dtype], name)


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('case', CASES, ids=_ids)
def test_fused_forward_and_backward(ops, case, dtype, path):
    _check_fused(ops, case, dtype, path)


@pytest.mark.parametrize('case', LARGE_CASES, ids=_ids)
def test_fused_large(ops, case, path):
    _check_fused(ops, case, torch.float16, path)


@pytest.mark.parametrize('dtype', DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize('case', [CASES[1], CASES[2], CASES[5]], ids=_ids)
def test_fused_backward_takes_the_lse_gradient(ops, case, dtype, path):
    """grad_lse joins the per-query delta of every path's query-side kernel."""
    _check_fused(ops, case, dtype, path, with_grad_lse=True)


@pytest.mark.parametrize('case', [CASES[1], CASES[2]], ids=_ids)
def test_fused_without_rpb(ops, case, path):
    _check_fused(ops, case, torch.float16, path, with_rpb=False)


def test_fused_float64_takes_the_simple_kernels(ops, monkeypatch):
    monkeypatch.delenv(FORCE_SIMPLE, raising=False)
    _check_fused(ops, CASES[3], torch.float64, 'default')


@pytest.mark.parametrize('case', [CASES[2], CASES[3], CASES[5]], ids=_ids)
@pytest.mark.parametrize('order, poison', [('forward', 'huge'), ('reverse', 'nan'),
                                           ('reverse', 'huge')])
def test_fused_other_interleavings(ops, case, path, order, poison, monkeypatch):
    """Another order of the threads and another shared-memory poison: a barrier the kernels
    lack shows in one of them (a lane reads what a later lane has not written yet)."""
    monkeypatch.setenv(ORDER, order)
    monkeypatch.setenv(POISON, poison)
    _check_fused(ops, case, torch.bfloat16, path)


@pytest.mark.parametrize('dtype', DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize('case', [CASES[1], CASES[3], CASES[5]], ids=_ids)
def test_unfused_ops(ops, case, dtype, padded=True):
    """na2d_qk (with and without rpb), na2d_av, na2d_inverse and na2d_rpb_grad."""
    q, k, v, rpb, g = _base(case, True)
    ks, dil = list(case[5]), list(case[6])
    cast = lambda t: _as_input(t, dtype, padded)
    for bias in (rpb, None):
        want = na2d_qk_reference(q, k, case[5], case[6], bias)
        got = ops.na2d_qk(cast(q), cast(k), None if bias is None else cast(bias), ks, dil)
        assert_scaled_close(got, want, TOL[dtype], 'na2d_qk')
    attn = _representable(torch.softmax(want, -1))
    k_leaf, bias_leaf = k.clone().requires_grad_(), rpb.clone().requires_grad_()
    grad_k, grad_rpb = torch.autograd.grad(
        na2d_qk_reference(q, k_leaf, case[5], case[6], bias_leaf), (k_leaf, bias_leaf), attn)
    av_want = na2d_av_reference(attn, v, case[5], case[6])
    tol = TOL[dtype]
    assert_scaled_close(ops.na2d_av(cast(attn), cast(v), ks, dil), av_want, tol, 'na2d_av')
    assert_scaled_close(ops.na2d_inverse(cast(attn), cast(q), ks, dil), grad_k, tol,
                        'na2d_inverse')
    assert_scaled_close(ops.na2d_rpb_grad(cast(attn), ks, dil), grad_rpb, tol, 'na2d_rpb_grad')
    assert set(_launched(ops)) >= {'qk_kernel', 'av_kernel', 'inverse_kernel',
                                   'rpb_partial_kernel', 'rpb_reduce_kernel'}


@pytest.mark.parametrize('shape', [(0, 2, 9, 9, 16), (1, 0, 9, 9, 16), (1, 2, 9, 9, 0)],
                         ids=['batch0', 'heads0', 'dim0'])
def test_fused_empty_inputs(ops, shape, path):
    """An empty batch, no heads or head dim 0: right shapes, no launch of an empty grid
    (an error on a GPU)."""
    q = torch.randn(*shape).half()
    rpb = torch.randn(shape[1], 5, 5).half()
    out, lse = ops.na2d_fused(q, q, q, rpb, [3, 3], [1, 1], 0.25)
    grads = ops.na2d_fused_backward(q, q, q, q, rpb, out, lse, [3, 3], [1, 1], 0.25)
    assert out.shape == q.shape and lse.shape == q.shape[:4]
    assert [g.shape for g in grads] == [q.shape] * 3 + [rpb.shape]
    assert all(torch.isfinite(g).all() for g in grads)


def test_fused_non_contiguous_inputs(ops, path):
    x = torch.randn(1, 9, 9, 2, 16).half().permute(0, 3, 1, 2, 4)  # [B, heads, H, W, D] view
    assert not x.is_contiguous()
    out, lse = ops.na2d_fused(x, x, x, None, [3, 3], [1, 1], 0.25)
    c = x.contiguous()
    want, want_lse = ops.na2d_fused(c, c, c, None, [3, 3], [1, 1], 0.25)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize('index', range(len(IDS)), ids=IDS)
def test_entry_points_check_their_inputs(ops, index):
    """The CUDA entry points, called with one bad argument, raise naming it."""
    _, name, build, match, error = bad_calls('cpu')[index]
    q = torch.randn(1, 2, 9, 9, 8)
    with pytest.raises(error, match=match):
        getattr(ops, name)(*build(q))


# ------------------------------------------------------------------ the emulation itself
def test_selftest_warp_shuffle(ops):
    out = ops.selftest('warp_sum')
    assert out[:32].eq(sum(range(32))).all() and out[32:].eq(sum(range(32, 64))).all()


def test_selftest_wmma_layouts(ops):
    r = ops.selftest('wmma')
    a, b, out = r[:256].view(16, 16), r[256:512].view(16, 16), r[512:].view(2, 16, 16)
    assert torch.equal(out[0], a @ b.T)  # B read column-major
    assert torch.equal(out[1], a @ b)     # B read row-major


def test_selftest_unwritten_shared_memory_reads_poison(ops, monkeypatch):
    out = ops.selftest('uninitialized_shared')
    assert torch.equal(out[0::2], torch.arange(0, 64, 2, dtype=torch.float32))
    assert out[1::2].isnan().all()
    monkeypatch.setenv(POISON, 'huge')
    assert ops.selftest('uninitialized_shared')[1::2].eq(float.fromhex('0x1.fefefep+127')).all()


def test_selftest_missing_syncwarp_shows(ops, monkeypatch):
    assert torch.equal(ops.selftest('neighbour_read_synced'),
                       (torch.arange(32, dtype=torch.float32) + 1) % 32)
    assert ops.selftest('neighbour_read_unsynced')[:31].isnan().all()
    monkeypatch.setenv(ORDER, 'reverse')
    assert ops.selftest('neighbour_read_unsynced')[31].isnan()


@pytest.mark.parametrize('name, match', [
    ('divergent_barrier', 'deadlock'),
    ('exited_lane_shuffle', 'not all its lanes reach'),
    ('shared_memory_limit', 'no cudaFuncSetAttribute opt-in'),
    ('misaligned_vector', 'misaligned 16-byte store'),
    ('misaligned_wmma', 'load_matrix_sync: pointer .* not 32-byte aligned'),
    ('write_past_shared', 'write past the dynamic shared memory'),
])
def test_selftest_faults_raise(ops, name, match):
    with pytest.raises(RuntimeError, match=match):
        ops.selftest(name)
    assert ops.selftest('warp_sum')[0] == sum(range(32))  # the next launch runs normally


def test_selftest_shared_memory_opt_in(ops):
    assert ops.selftest('shared_memory_optin')[:32].eq(1).all()  # one block of 32 threads


def _random_case(rng):
    """A random problem small enough for the emulation (at most 150k elements per tensor)."""
    while True:
        ks = (rng.choice([3, 5, 7, 9, 11, 13]), rng.choice([3, 5, 7, 9, 11, 13]))
        dil = (rng.choice([1, 1, 2, 3, 4]), rng.choice([1, 1, 2, 3, 4]))
        size = [rng.randint(k * d, max(k * d, 36)) for k, d in zip(ks, dil)]
        case = (rng.choice([1, 2]), rng.choice([1, 2]), *size,
                rng.choice([8, 16, 24, 32, 33, 48, 64, 100, 128]), ks, dil)
        if case[0] * case[1] * size[0] * size[1] * case[4] <= 150_000:
            return case


@pytest.mark.slow
@pytest.mark.parametrize('seed', range(40))
def test_fused_random_shapes(ops, seed, monkeypatch):
    """Random shapes, kernels, dilations, dtypes, paths, thread orders and poisons; values
    only (which kernels run depends on what fits shared memory)."""
    rng = random.Random(seed)
    case = _random_case(rng)
    path = rng.choice(['simple', 'default', 'tensor-cores'])
    select_path(path, monkeypatch.setenv, lambda name: monkeypatch.delenv(name, raising=False))
    monkeypatch.setenv(ORDER, rng.choice(['forward', 'reverse']))
    monkeypatch.setenv(POISON, rng.choice(['nan', 'huge']))
    _check_fused(ops, case, rng.choice(DTYPES), path, with_rpb=rng.random() < 0.8,
                 check_kernels=False, with_grad_lse=rng.random() < 0.5)


# ------------------------------------------------------------------ AddressSanitizer
def _run_under_asan(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get('PYTHONPATH')) if p)
    env = dict(os.environ, LD_PRELOAD=asan_runtime(), ASAN_OPTIONS='detect_leaks=0',
               PYTHONPATH=path)
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.skipif(asan_runtime() is None, reason='no AddressSanitizer runtime (libasan)')
def test_kernels_under_address_sanitizer():
    """Every path on exact-size tensors in a build with AddressSanitizer: no kernel reads or
    writes past a tensor, even where the result would not show it. The faulty self-test
    kernel shows that such a read is reported through the fibers."""
    fault = _run_under_asan('--asan', 'read_past_input')
    assert fault.returncode != 0 and 'heap-buffer-overflow' in fault.stderr, fault.stderr[-3000:]
    clean = _run_under_asan('--asan')
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-6000:]
    assert 'AddressSanitizer' not in clean.stderr
    assert 'checked 27 runs' in clean.stdout, clean.stdout[-2000:]


def _asan_main(argv):
    """Run by the test above in a process that preloads the AddressSanitizer runtime."""
    ops = emulated_ops(asan=True)
    if argv:  # a self-test case
        ops.selftest(argv[0])
        return
    runs = 0
    for path in ('simple', 'default', 'tensor-cores'):
        select_path(path, os.environ.__setitem__, lambda name: os.environ.pop(name, None))
        for i, case in enumerate(CASES):
            _check_fused(ops, case, torch.float16, path, padded=False,
                         with_grad_lse=i % 2 == 1)
            runs += 1
    for case in [CASES[1], CASES[3], CASES[5]]:
        test_unfused_ops(ops, case, torch.float32, padded=False)
        runs += 1
    print(f'checked {runs} runs')


if __name__ == '__main__':
    assert sys.argv[1:2] == ['--asan'], 'usage: test_cuda_emulation.py --asan [selftest case]'
    _asan_main(sys.argv[2:])
