"""The CPU kernels' fast paths, each against the pure-PyTorch kernels (nat_mm.ops.fallback).

The general cases in test_ops.py use small maps, where most queries are border queries.
These maps are wide enough for what the kernels do in the interior: runs of one vector of
queries (float32: 16 lanes with AVX-512, float64: 8), a last run that overlaps its
predecessor, band kernels for the weighted sums (kernel width <= 13, head dim a whole
number of vectors, no column dilation) and their key-side bands, and the fused backward's
row segments (a unit's rows split over threads, each segment recomputing halo rows).
"""
import pytest
import torch

from nat_mm.ops import fallback
from nat_mm.ops.library import op

pytestmark = pytest.mark.filterwarnings("ignore:nat_mm. no compiled")

# (batch, heads, H, W, head_dim, kernel_size, dilation, what it reaches)
CASES = [
    (1, 2, 12, 53, 32, (7, 7), (1, 1)),    # runs + an overlapping last run, key bands
    (2, 1, 9, 40, 16, (3, 5), (1, 1)),     # small kernels, overlap of 8 (float32)
    (1, 1, 15, 64, 32, (13, 13), (1, 1)),  # the widest band kernel
    (1, 1, 17, 70, 16, (7, 15), (1, 1)),   # no band kernel for kw 15: vector-lane key runs
    (1, 2, 11, 47, 24, (5, 7), (1, 1)),    # head dim 24: band in float64 only
    (1, 1, 14, 61, 16, (5, 3), (2, 3)),    # column dilation: runs without bands
    (2, 2, 8, 21, 8, (7, 7), (1, 1)),      # interior narrower than a float32 run
    (2, 2, 14, 14, 32, (7, 7), (1, 1)),    # NAT's 14x14 maps: all border, groups of 4
    (1, 2, 23, 40, 16, (5, 7), (3, 1)),    # row dilation 3: the key-row cache over residues
]


def _ids(case):
    return 'B{}h{}_{}x{}_D{}_k{}x{}_d{}x{}'.format(*case[:5], *case[5], *case[6])


def _inputs(case, dtype, seed=0):
    batch, heads, height, width, dim, ks, _ = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q, k, v = (rand(batch, heads, height, width, dim) for _ in range(3))
    return q, k, v, rand(heads, 2 * ks[0] - 1, 2 * ks[1] - 1)


def _fused_both_ways(case, dtype, scale=0.3):
    """(out, lse, grads) from the compiled kernels and from the pure-PyTorch ones, the
    latter in float64."""
    q, k, v, rpb = _inputs(case, dtype)
    ks, dil = list(case[5]), list(case[6])
    out, lse = op('na2d_fused')(q, k, v, rpb, ks, dil, scale)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(dtype)
    grads = op('na2d_fused_backward')(grad_out, q, k, v, rpb, out, lse, ks, dil, scale)
    d = [t.double() for t in (q, k, v, rpb, grad_out)]
    want_out, want_lse = fallback._fused(*d[:4], ks, dil, scale)
    want_grads = fallback._fused_backward(d[4], *d[:4], want_out, want_lse, ks, dil, scale)
    return (out, lse, *grads), (want_out, want_lse, *want_grads)


@pytest.mark.parametrize('case', CASES, ids=_ids)
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-10), (torch.float32, 2e-4)],
                         ids=['float64', 'float32'])
def test_fused_forward_and_backward(case, dtype, tol):
    got, want = _fused_both_ways(case, dtype)
    names = ['out', 'lse', 'grad_query', 'grad_key', 'grad_value', 'grad_rpb']
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize('case', CASES, ids=_ids)
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-10), (torch.float32, 2e-4)],
                         ids=['float64', 'float32'])
def test_unfused_ops(case, dtype, tol):
    q, k, v, rpb = _inputs(case, dtype)
    ks, dil = list(case[5]), list(case[6])
    attn = op('na2d_qk')(q, k, rpb, ks, dil).softmax(-1)
    weights = torch.rand(attn.shape, generator=torch.Generator().manual_seed(2),
                         dtype=torch.float64).to(dtype)
    got = [attn, op('na2d_av')(attn, v, ks, dil), op('na2d_inverse')(weights, q, ks, dil)]
    d = [t.double() for t in (q, k, v, rpb)]
    want_attn = fallback._qk(d[0], d[1], d[3], ks, dil).softmax(-1)
    want = [want_attn, fallback._av(attn.double(), d[2], ks, dil),
            fallback._inverse(weights.double(), d[0], ks, dil)]
    for name, g, w in zip(['attn', 'av', 'inverse'], got, want):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize('threads', [2, 3, 5])
def test_backward_segments_match_one_thread(threads):
    """One plane, rows >= 8 kernels: with more threads than planes the backward splits the
    rows into segments (halo rows recomputed). Every gradient must be bit-identical to the
    single-thread result, and right."""
    case = (1, 1, 64, 37, 16, (5, 7), (1, 1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, want = _fused_both_ways(case, torch.float64)
        torch.set_num_threads(threads)
        split, _ = _fused_both_ways(case, torch.float64)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(single, split):
        assert torch.equal(a, b)
    for g, w in zip(split, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_backward_segments_with_row_dilation():
    """Segments are per (plane, row residue): dilated rows interleave two sub-grids."""
    case = (1, 1, 171, 30, 8, (5, 5), (2, 1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        got, want = _fused_both_ways(case, torch.float64)
    finally:
        torch.set_num_threads(before)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def _qkv_views(q, k, v):
    """q, k, v as NAT's attention passes them: views of one qkv projection output
    [B, H, W, 3, heads, D] (columns 3*heads*D apart), with the same values."""
    packed = torch.stack([q, k, v]).permute(1, 3, 4, 0, 2, 5).contiguous()
    return packed.permute(3, 0, 4, 1, 2, 5).unbind(0)


def _heads_last_view(x):
    """x's values as a view of a [B, H, W, heads, D] tensor (how grad_out arrives)."""
    return x.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)


@pytest.mark.parametrize('case', CASES, ids=_ids)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_strided_maps_are_read_in_place(case, dtype):
    """Views with strided rows and columns (contiguous channels) give bit-identical results
    to contiguous copies: the kernels read them in place, in the same order."""
    q, k, v, rpb = _inputs(case, dtype)
    ks, dil = list(case[5]), list(case[6])
    qs, kss, vs = _qkv_views(q, k, v)
    assert not qs.is_contiguous() and qs.stride(3) == 3 * q.shape[1] * q.shape[4]
    out, lse = op('na2d_fused')(q, k, v, rpb, ks, dil, 0.3)
    out_s, lse_s = op('na2d_fused')(qs, kss, vs, rpb, ks, dil, 0.3)
    assert torch.equal(out, out_s) and torch.equal(lse, lse_s)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64).to(dtype)
    want = op('na2d_fused_backward')(grad_out, q, k, v, rpb, out, lse, ks, dil, 0.3)
    got = op('na2d_fused_backward')(_heads_last_view(grad_out), qs, kss, vs, rpb,
                                    _heads_last_view(out), lse, ks, dil, 0.3)
    for name, g, w in zip(['grad_query', 'grad_key', 'grad_value', 'grad_rpb'], got, want):
        assert torch.equal(g, w), name
    attn = op('na2d_qk')(q, k, rpb, ks, dil).softmax(-1)
    assert torch.equal(op('na2d_qk')(qs, kss, rpb, ks, dil).softmax(-1), attn)
    assert torch.equal(op('na2d_av')(attn, vs, ks, dil), op('na2d_av')(attn, v, ks, dil))
    assert torch.equal(op('na2d_inverse')(attn, qs, ks, dil),
                       op('na2d_inverse')(attn, q, ks, dil))
