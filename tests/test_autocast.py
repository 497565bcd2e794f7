"""The NA ops inside torch.autocast: they run in the region's dtype, like matmul and SDPA."""
import pytest
import torch

from nat_mm.ops import na2d, na2d_av, na2d_qk
from nat_mm.ops.library import op
from op_samples import public_calls

KERNEL, DILATION = (3, 5), (2, 1)
LOW_DTYPES = [torch.bfloat16, torch.float16]
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU'))]


def float32_inputs(device='cpu', seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    return rand(2, 2, 9, 11, 8), rand(2, 2, 9, 11, 8), rand(2, 2, 9, 11, 8), rand(2, 5, 9)


def cast_leaves(tensors, dtype):
    """Leaves of ``dtype`` holding what autocast's cast would give the float32 tensors."""
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


PUBLIC_CALLS = public_calls(KERNEL, DILATION)


@pytest.mark.parametrize('dtype', LOW_DTYPES, ids=str)
@pytest.mark.parametrize('name', list(PUBLIC_CALLS))
@pytest.mark.parametrize('device', DEVICES)
def test_public_functions_run_in_the_autocast_dtype(device, name, dtype):
    call = PUBLIC_CALLS[name]
    q, k, v, rpb = float32_inputs(device)
    inputs = [q.detach().to(dtype).requires_grad_(), k, v, rpb]  # mixed, as out of a Linear
    with torch.autocast(device, dtype=dtype):
        out = call(*inputs)
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    got = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)

    # the same computation with the inputs cast by hand, outside autocast
    cast = cast_leaves(inputs, dtype)
    expected = call(*cast)
    want = torch.autograd.grad(expected, cast, grad_out, allow_unused=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for g, w, x in zip(got, want, inputs):
        if w is None:  # na2d_qk does not read value
            assert g is None
            continue
        assert g.dtype == x.dtype  # autograd casts back to the leaf's dtype
        torch.testing.assert_close(g, w.to(x.dtype), atol=0, rtol=0)


def test_direct_op_calls_run_in_the_autocast_dtype():
    q, k, v, rpb = (t.detach() for t in float32_inputs())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, lse = op('na2d_fused')(q, k, v, rpb, KERNEL, DILATION, 0.25)
        attn = op('na2d_qk')(q.bfloat16(), k, rpb, KERNEL, DILATION)  # mixed dtypes
        mixed = op('na2d_av')(attn.float(), v, KERNEL, DILATION)
    assert out.dtype == attn.dtype == mixed.dtype == torch.bfloat16
    assert lse.dtype == torch.float32  # the statistics stay float32
    cast = [t.bfloat16() for t in (q, k, v, rpb)]
    torch.testing.assert_close(out, op('na2d_fused')(*cast, KERNEL, DILATION, 0.25)[0],
                               atol=0, rtol=0)


def test_float32_attention_map_meets_half_precision_values():
    # CUDA's autocast runs softmax in float32, so NAT's unfused path (attention dropout)
    # hands na2d_av a float32 map and float16 values
    q, k, v, rpb = (t.detach() for t in float32_inputs())
    attn = na2d_qk(q, k, KERNEL, DILATION, rpb=rpb).softmax(-1)
    with torch.autocast('cpu', dtype=torch.float16):
        out = na2d_av(attn, v.half(), KERNEL, DILATION)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, na2d_av(attn.half(), v.half(), KERNEL, DILATION),
                               atol=0, rtol=0)


def test_float64_is_left_alone():
    q, k, v, rpb = (t.detach().double() for t in float32_inputs())
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert na2d(q, k, v, KERNEL, DILATION, rpb=rpb).dtype == torch.float64
        with pytest.raises(TypeError,
                           match='rpb has dtype torch.bfloat16.*inside torch.autocast'):
            na2d(q, k, v, KERNEL, DILATION, rpb=rpb.float())  # cast to bfloat16, unlike q


def test_no_cast_outside_autocast_or_for_another_device():
    q, k, v, rpb = float32_inputs()
    with pytest.raises(TypeError, match='cast them to one dtype'):
        na2d(q, k, v, KERNEL, DILATION, rpb=rpb.bfloat16())
    with torch.autocast('cuda', dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert na2d(q, k, v, KERNEL, DILATION, rpb=rpb).dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=False):
        assert na2d(q, k, v, KERNEL, DILATION, rpb=rpb).dtype == torch.float32


@pytest.mark.parametrize('device', DEVICES)
def test_compiled_under_autocast_matches_eager(device):
    inputs = [t.detach() for t in float32_inputs(device)]

    def public(q, k, v, rpb):
        return na2d(q, k, v, KERNEL, DILATION, rpb=rpb) * 2

    def direct(q, k, v, rpb):  # the ops' Autocast kernels, traced
        return op('na2d_fused')(q, k, v, rpb, KERNEL, DILATION, 0.25)[0] * 2

    for fn in (public, direct):
        compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
        with torch.autocast(device, dtype=torch.bfloat16):
            expected, got = fn(*inputs), compiled(*inputs)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize('name', list(PUBLIC_CALLS))
@pytest.mark.parametrize('create_graph', [False, True], ids=['backward', 'double-backward'])
def test_backward_inside_autocast_keeps_the_forward_dtypes(name, create_graph):
    # a float32 forward (autocast disabled around it), then its backward inside the region
    # (e.g. a gradient penalty): the backward's op calls must not be cast half-way
    call = PUBLIC_CALLS[name]
    inputs = float32_inputs()

    def penalty():
        with torch.autocast('cpu', enabled=False):
            out = call(*inputs)
        grads = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=create_graph,
                                    allow_unused=True)
        used = [(g, x) for g, x in zip(grads, inputs) if g is not None]
        if create_graph:
            grads = torch.autograd.grad(sum(g.pow(2).sum() for g, _ in used),
                                        [x for _, x in used])
        return grads

    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = penalty()
    expected = penalty()
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if e is not None:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, e, atol=0, rtol=0)
