"""Forward-mode AD through the public NA functions: torch.func.jvp / jacfwd and
torch.autograd.forward_ad give the true tangents (through the reference, with a warning),
equal to what reverse mode through the compiled kernels gives."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from nat_mm.ops import forward_ad, na2d, na2d_av, na2d_qk

KERNEL, DILATION = (3, 5), (2, 1)

# each public function of (q, k, v, rpb)
PUBLIC_CALLS = {
    'na2d': lambda q, k, v, rpb: na2d(q, k, v, KERNEL, DILATION, rpb=rpb),
    'na2d_qk': lambda q, k, v, rpb: na2d_qk(q, k, KERNEL, DILATION, rpb=rpb),
    'na2d_av': lambda q, k, v, rpb: na2d_av(
        na2d_qk(q, k, KERNEL, DILATION, rpb=rpb).softmax(-1), v, KERNEL, DILATION),
}


def primals_and_tangents(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shapes = [(1, 2, 9, 11, 4)] * 3 + [(2, 5, 9)]
    return [rand(*s) for s in shapes], [rand(*s) for s in shapes]


@pytest.fixture(autouse=True)
def quiet_reference_warning(monkeypatch):
    monkeypatch.setattr(forward_ad, '_warned', True)


@pytest.mark.parametrize('name', list(PUBLIC_CALLS))
def test_jvp_matches_reverse_mode_through_the_kernels(name):
    call = PUBLIC_CALLS[name]
    primals, tangents = primals_and_tangents()
    out, tangent_out = torch.func.jvp(call, tuple(primals), tuple(tangents))
    # reverse mode (the compiled kernels' backward, differentiated again) gives the jvp too
    expected_out, expected = torch.autograd.functional.jvp(call, tuple(primals),
                                                           tuple(tangents))
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=1e-10)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(tangent_out, expected, atol=1e-10, rtol=1e-8)


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


def test_reference_path_is_announced_once_and_only_for_tangents(monkeypatch):
    monkeypatch.setattr(forward_ad, '_warned', False)
    primals, tangents = primals_and_tangents()
    call = PUBLIC_CALLS['na2d']
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        call(*primals)  # no tangent: the compiled kernels, no warning
    with pytest.warns(RuntimeWarning, match='forward-mode AD'):
        torch.func.jvp(call, tuple(primals), tuple(tangents))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        torch.func.jvp(call, tuple(primals), tuple(tangents))  # said once


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
        torch.testing.assert_close(torch.func.vmap(call)(qs), torch.stack([call(x) for x in qs]))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_reference_path_is_as_precise_as_the_kernels(dtype):
    # in half precision the reference runs in float32, as the kernels accumulate
    primals, tangents = primals_and_tangents()
    call = PUBLIC_CALLS['na2d']
    oracle = call(*primals)
    half = [t.to(dtype) for t in primals]
    out, _ = torch.func.jvp(call, tuple(half), tuple(t.to(dtype) for t in tangents))
    assert out.dtype == dtype
    kernel_error = (call(*half).double() - oracle).abs().max()
    assert (out.double() - oracle).abs().max() <= 1.5 * kernel_error
