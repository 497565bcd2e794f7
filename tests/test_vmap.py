"""torch.func.vmap over the NA ops: one kernel call per vmap (the vmapped dim folds into
the batch, or into the heads where samples differ in their bias), equal to a loop over the
samples, forward and gradients."""
import pytest
import torch

from nat_mm.ops import na2d
from nat_mm.ops.library import SCHEMAS, op
from op_samples import OpLog, opcheck_samples, public_calls

N, KERNEL, DILATION = 3, (3, 5), (2, 1)
MAP = (2, 2, 9, 11, 8)  # [B, heads, H, W, D]
BIAS = (2, 5, 9)

PUBLIC_CALLS = public_calls(KERNEL, DILATION)

# (q, k, v, rpb) vmapped dims: all at 0; shared key and bias, value vmapped at dim 2;
# only the bias vmapped (an ensemble of biases)
IN_DIMS = [(0, 0, 0, 0), (0, None, 2, None), (None, None, None, 0)]


FOLDED_BATCH, FOLDED_HEADS = (N * MAP[0], MAP[1]), (MAP[0], N * MAP[1])


def inputs_for(in_dims, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = (MAP, MAP, MAP, BIAS)
    out = []
    for shape, dim in zip(shapes, in_dims):
        x = torch.randn(N, *shape, generator=gen) if dim is not None else torch.randn(
            *shape, generator=gen)
        out.append((x.movedim(0, dim) if dim else x).requires_grad_())
    return out


def sample(x, dim, i):
    return x if dim is None else x.select(dim, i)


@pytest.mark.parametrize('in_dims', IN_DIMS, ids=str)
@pytest.mark.parametrize('name', list(PUBLIC_CALLS))
def test_vmap_matches_a_loop_in_one_call_per_op(name, in_dims):
    call = PUBLIC_CALLS[name]
    inputs = inputs_for(in_dims)
    with OpLog() as log:
        out = torch.func.vmap(call, in_dims=in_dims)(*inputs)
    expected = torch.stack([call(*(sample(x, d, i) for x, d in zip(inputs, in_dims)))
                            for i in range(N)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # one call per op (torch's fallback would call each op N times), the samples folded
    # into the batch, or into the heads for the ops that read a vmapped bias
    bias_vmapped = in_dims[3] is not None
    assert log.calls and all(
        shape == (FOLDED_HEADS if bias_vmapped and op_name in ('na2d_qk', 'na2d_fused')
                  else FOLDED_BATCH) for op_name, shape in log.calls)
    assert len(log.calls) == len({op_name for op_name, _ in log.calls})

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, grad_out, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def op_arguments(seed):
    """{op name: arguments of a direct call} for every op (tests/op_samples.py)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(MAP, generator=gen) for _ in range(4))
    weights = torch.randn(*MAP[:4], KERNEL[0] * KERNEL[1], generator=gen)
    rpb = torch.randn(BIAS, generator=gen)
    return opcheck_samples(q, k, v, rpb, weights, grad_out, KERNEL, DILATION)


@pytest.mark.parametrize('name', list(SCHEMAS))
def test_every_op_batches_in_one_call(name):
    # the backward ops included: vmap over a backward (batched vector-Jacobian products,
    # per-sample gradients) calls them with vmapped gradients
    samples = [op_arguments(seed)[name] for seed in range(N)]
    stacked = [torch.stack([args[i].detach() for args in samples])
               if isinstance(arg, torch.Tensor) else arg for i, arg in enumerate(samples[0])]
    in_dims = tuple(0 if isinstance(arg, torch.Tensor) else None for arg in stacked)
    with OpLog() as log:
        got = torch.func.vmap(op(name), in_dims=in_dims)(*stacked)
    by_heads = name in ('na2d_qk', 'na2d_fused', 'na2d_rpb_grad', 'na2d_fused_backward')
    assert log.calls == [(name, FOLDED_HEADS if by_heads else FOLDED_BATCH)]
    loop = [op(name)(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
            for args in samples]
    if isinstance(got, torch.Tensor):
        got, loop = (got, ), [(x, ) for x in loop]
    for i, g in enumerate(got):
        torch.testing.assert_close(g, torch.stack([x[i] for x in loop]), atol=1e-5,
                                   rtol=1e-5)


def test_nested_vmap():
    # vmap over samples of vmap over biases: each level folds its dim into the heads
    gen = torch.Generator().manual_seed(3)
    q, rpb = torch.randn(2, N, *MAP, generator=gen), torch.randn(N, *BIAS, generator=gen)
    call = PUBLIC_CALLS['na2d']
    with OpLog() as log:
        out = torch.func.vmap(torch.func.vmap(lambda x, b: call(x, x, x, b)),
                              in_dims=(0, None))(q, rpb)
    assert log.calls == [('na2d_fused', (2 * MAP[0], N * MAP[1]))]
    expected = torch.stack([torch.stack([call(q[i, j], q[i, j], q[i, j], rpb[j])
                                         for j in range(N)]) for i in range(2)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_vmapped_dim_first_folds_into_the_batch_as_a_view():
    q = torch.randn(N, *MAP)
    with OpLog() as log:
        torch.func.vmap(lambda x: na2d(x, x, x, KERNEL, DILATION))(q)
    assert log.first_args[0].data_ptr() == q.data_ptr()  # no copy of the inputs


@pytest.mark.parametrize('rpb_dim', [None, 0])
def test_vmap_over_no_samples(rpb_dim):
    q = torch.randn(0, *MAP)
    rpb = torch.randn(*((0, ) if rpb_dim == 0 else ()), *BIAS)
    out = torch.func.vmap(PUBLIC_CALLS['na2d'], in_dims=(0, 0, 0, rpb_dim))(q, q, q, rpb)
    assert out.shape == (0, *MAP)


def test_direct_op_errors_name_one_samples_shapes():
    q, rpb = torch.randn(N, *MAP), torch.randn(N, 1, *BIAS[1:])  # one head, query has two
    with pytest.raises(ValueError) as plain:
        op('na2d_qk')(q[0], q[0], rpb[0], KERNEL, DILATION)
    with pytest.raises(ValueError) as vmapped:
        torch.func.vmap(lambda a, b: op('na2d_qk')(a, a, b, KERNEL, DILATION))(q, rpb)
    assert str(vmapped.value) == str(plain.value)


def test_export_of_a_vmapped_function():
    class Ensemble(torch.nn.Module):
        def forward(self, q, rpb):
            return torch.func.vmap(lambda x, b: na2d(x, x, x, KERNEL, DILATION, rpb=b))(q, rpb)

    q, rpb = torch.randn(N, *MAP), torch.randn(N, *BIAS)
    program = torch.export.export(Ensemble(), (q, rpb))  # non-strict: torch's default
    torch.testing.assert_close(program.module()(q, rpb), Ensemble()(q, rpb))


def test_every_op_has_a_batching_rule():
    for name in SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f'nat_mm::{name}',
                                                              'FuncTorchBatched'), name


def test_vmap_over_an_ensemble_of_backbones():
    # torch.func's model ensembling: one forward of the stacked weights of N models
    from torch.func import functional_call, stack_module_state

    from nat_mm.models import NAT
    torch.manual_seed(0)
    models = [NAT(arch='mini', depths=(1, 1, 1, 1)).eval() for _ in range(N)]
    params, buffers = stack_module_state(models)
    skeleton = NAT(arch='mini', depths=(1, 1, 1, 1)).eval().to('meta')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), OpLog() as log:
        outs = torch.func.vmap(lambda p, b: functional_call(skeleton, (p, b), (x, )))(
            params, buffers)
    assert len(log.calls) == 4  # one fused call per layer, for all N models
    with torch.no_grad():
        for level, out in enumerate(outs):
            torch.testing.assert_close(out, torch.stack([m(x)[level] for m in models]),
                                       atol=1e-5, rtol=1e-5)
