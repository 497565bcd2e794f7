"""Property-based fuzzing of the public operators na2d, na2d_qk and na2d_av (issue 7).

Each op gets 500 generated argument sets (hypothesis, derandomized: the same sets on
every run), a mix of

* valid calls: batch/heads 0..2, maps up to 12x12, head_dim 0..8, odd kernels 3..7 per
  axis, dilations 1..4, float16/bfloat16/float32/float64, rpb or not, explicit scale or
  not, non-contiguous inputs (permuted, strided slices, stride-0 broadcast), 'meta'
  tensors, NaN / Inf injected at one position, huge values (logits ~1e4);
* invalid calls: wrong types, dtypes, ranks, shapes, devices, kernel sizes, dilations,
  maps smaller than kernel*dilation, bad rpb / scale, mixed dtypes.

Valid calls must match the float64 reference (``nat_mm.ops.reference``) within an error
bound derived from the inputs' magnitudes, and have NaN / non-finite entries exactly where
the reference has them (a NaN key poisons exactly the queries whose neighborhood holds
it); huge logits stay finite in the fused op. Invalid calls must raise TypeError or
ValueError. Anything else -- another exception, a crash, a wrong value -- fails.
"""

import pytest
import torch

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nat_mm.ops import na2d, na2d_av, na2d_qk  # noqa: E402
from nat_mm.ops import reference  # noqa: E402

MAX_EXAMPLES = 500
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# error per operation of the kernel's arithmetic and output rounding, by input dtype
EPS = {torch.float64: 1e-15, torch.float32: 2e-7, torch.float16: 1e-3,
       torch.bfloat16: 8e-3}
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
LAYOUTS = ['contiguous', 'permuted', 'sliced', 'transposed_hw', 'broadcast']
SPECIALS = ['none', 'none', 'none', 'nan', 'inf', 'huge']

COUNTS = {'na2d': {'valid': 0, 'invalid': 0}, 'na2d_qk': {'valid': 0, 'invalid': 0},
          'na2d_av': {'valid': 0, 'invalid': 0}}


# ------------------------------------------------------------------ tensor builders
def make_tensor(shape, dtype, device, layout, generator, magnitude=1.0):
    """A tensor of ``shape`` with the requested memory layout (values on the CPU first,
    drawn from ``generator``, so every run is the same)."""
    shape = tuple(shape)
    if layout == 'broadcast' and len(shape) == 5 and shape[0] > 0:
        base = torch.randn((1,) + shape[1:], generator=generator, dtype=torch.float64)
        base = (base * magnitude).to(dtype).to(device)
        return base.expand(shape)  # stride 0 along batch
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * magnitude
    values = values.to(dtype)
    if layout == 'permuted' and len(shape) == 5:
        # stored [B, H, W, heads, D], seen as [B, heads, H, W, D]
        return values.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4).to(device)
    if layout == 'transposed_hw' and len(shape) == 5:
        return values.transpose(2, 3).contiguous().transpose(2, 3).to(device)
    if layout == 'sliced' and len(shape) >= 1:
        big = torch.zeros(shape[:-1] + (2 * shape[-1] + 1,), dtype=dtype)
        big[..., 1::2] = values
        return big.to(device)[..., 1::2]
    return values.to(device)


def inject(tensor, special, position, sign):
    """NaN or +-Inf at one flat position (on a private, writable copy)."""
    if special not in ('nan', 'inf') or tensor.numel() == 0:
        return tensor
    out = tensor.clone()
    flat = out.view(-1) if out.is_contiguous() else None
    value = float('nan') if special == 'nan' else sign * float('inf')
    if flat is None:
        out = out.contiguous()
        flat = out.view(-1)
    flat[position % flat.numel()] = value
    return out


def f64(x):
    return None if x is None else x.detach().to('cpu', torch.float64).contiguous()


# ------------------------------------------------------------------ strategies
@st.composite
def geometry(draw):
    """(B, heads, H, W, D, kernel_size, dilation) of a valid call."""
    kh = draw(st.sampled_from([3, 5, 7]))
    kw = draw(st.sampled_from([3, 5, 7]))
    dh = draw(st.integers(1, max(1, 12 // kh)))
    dw = draw(st.integers(1, max(1, 12 // kw)))
    height = draw(st.integers(kh * dh, 12))
    width = draw(st.integers(kw * dw, 12))
    zero = draw(st.sampled_from([None] * 12 + ['batch', 'heads', 'dim']))
    batch = 0 if zero == 'batch' else draw(st.integers(1, 2))
    heads = 0 if zero == 'heads' else draw(st.integers(1, 2))
    dim = 0 if zero == 'dim' else draw(st.integers(1, 8))
    kernel = draw(st.sampled_from([kh, (kh, kw), [kh, kw]])) if kh == kw else (kh, kw)
    dilation = draw(st.sampled_from([dh, (dh, dw)])) if dh == dw else (dh, dw)
    return batch, heads, height, width, dim, kernel, dilation, (kh, kw), (dh, dw)


INVALID = {
    'common': ['kernel_even', 'kernel_small', 'kernel_negative', 'kernel_float',
               'kernel_bool', 'kernel_triple', 'kernel_str', 'dilation_zero',
               'dilation_negative', 'dilation_float', 'map_too_small', 'int_dtype',
               'bool_dtype', 'complex_dtype', 'rank4', 'rank6', 'not_a_tensor',
               'numpy_input', 'mixed_dtype', 'mixed_device'],
    'na2d_qk': ['key_shape', 'rpb_shape', 'rpb_rank', 'rpb_dtype', 'rpb_device',
                'rpb_list'],
    'na2d_av': ['attn_window', 'attn_shape', 'value_shape'],
    'na2d': ['key_shape', 'value_shape', 'rpb_shape', 'rpb_dtype', 'scale_str',
             'scale_bool', 'scale_tensor_list'],
}


@st.composite
def cases(draw, op_name):
    geo = draw(geometry())
    valid = draw(st.integers(0, 9)) < 6  # ~60% valid
    mutation = None if valid else draw(st.sampled_from(INVALID['common'] + INVALID[op_name]))
    dtype = draw(st.sampled_from(DTYPES))
    device = draw(st.sampled_from(DEVICES + ['meta'] if draw(st.integers(0, 19)) == 0
                                  else DEVICES))
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    special = draw(st.sampled_from(SPECIALS))
    return dict(
        geo=geo, valid=valid, mutation=mutation, dtype=dtype, device=device,
        layouts=layouts, special=special,
        special_target=draw(st.integers(0, 3)), special_position=draw(st.integers(0, 10 ** 6)),
        special_sign=draw(st.sampled_from([1.0, -1.0])),
        with_rpb=draw(st.booleans()),
        scale=draw(st.sampled_from([None, None, 0.5, 1.0, 0.125, 2])),
        check_grad=draw(st.integers(0, 3)) == 0,
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


# ------------------------------------------------------------------ build the arguments
def build_args(op_name, case):
    batch, heads, height, width, dim, kernel, dilation, ks, dil = case['geo']
    dtype, device, layouts = case['dtype'], case['device'], case['layouts']
    generator = torch.Generator().manual_seed(case['seed'])
    huge = case['special'] == 'huge'
    magnitude = 1.0
    if huge:  # |logits| up to ~1e4 (fp16: products stay below its 65504 maximum)
        magnitude = 60.0 if dtype == torch.float16 else 100.0
    shape = (batch, heads, height, width, dim)
    window = ks[0] * ks[1]
    rpb_shape = (heads, 2 * ks[0] - 1, 2 * ks[1] - 1)
    if op_name == 'na2d_av':
        attn = make_tensor((batch, heads, height, width, window), dtype, device,
                           layouts[0], generator)
        if not huge:
            attn = attn.softmax(-1) if attn.numel() else attn
        value = make_tensor(shape, dtype, device, layouts[1], generator,
                            magnitude=magnitude)
        tensors = {'attn': attn, 'value': value}
    else:
        tensors = {'query': make_tensor(shape, dtype, device, layouts[0], generator,
                                        magnitude),
                   'key': make_tensor(shape, dtype, device, layouts[1], generator,
                                      magnitude)}
        if op_name == 'na2d':
            tensors['value'] = make_tensor(shape, dtype, device, layouts[2], generator)
        tensors['rpb'] = (make_tensor(rpb_shape, dtype, device, 'contiguous', generator)
                          if case['with_rpb'] else None)
    # NaN / Inf at one position of one input
    names = [n for n, t in tensors.items() if t is not None]
    target = names[case['special_target'] % len(names)]
    if device != 'meta':
        tensors[target] = inject(tensors[target], case['special'],
                                 case['special_position'], case['special_sign'])
    kwargs = dict(kernel_size=kernel, dilation=dilation)
    if op_name == 'na2d':
        kwargs['scale'] = case['scale']
    return tensors, kwargs


def mutate(op_name, tensors, kwargs, mutation, case):
    """Turn a valid call into an invalid one."""
    batch, heads, height, width, dim, kernel, dilation, ks, dil = case['geo']
    first = 'attn' if op_name == 'na2d_av' else 'query'
    second = 'value' if op_name == 'na2d_av' else 'key'
    t = dict(tensors)
    k = dict(kwargs)
    if mutation == 'kernel_even':
        k['kernel_size'] = (ks[0] + 1, ks[1]) if case['seed'] % 2 else ks[0] + 1
    elif mutation == 'kernel_small':
        k['kernel_size'] = case['seed'] % 3  # 0, 1 or 2
    elif mutation == 'kernel_negative':
        k['kernel_size'] = (-ks[0], ks[1])
    elif mutation == 'kernel_float':
        k['kernel_size'] = float(ks[0])
    elif mutation == 'kernel_bool':
        k['kernel_size'] = True
    elif mutation == 'kernel_triple':
        k['kernel_size'] = (ks[0], ks[1], 3)
    elif mutation == 'kernel_str':
        k['kernel_size'] = '3'
    elif mutation == 'dilation_zero':
        k['dilation'] = (0, dil[1])
    elif mutation == 'dilation_negative':
        k['dilation'] = -1
    elif mutation == 'dilation_float':
        k['dilation'] = 1.5
    elif mutation == 'map_too_small':
        # dilation such that kernel*dilation exceeds the map along one axis
        k['dilation'] = (height // ks[0] + 1, dil[1])
    elif mutation in ('int_dtype', 'bool_dtype', 'complex_dtype'):
        new = {'int_dtype': torch.int32, 'bool_dtype': torch.bool,
               'complex_dtype': torch.complex64}[mutation]
        name = second if case['seed'] % 2 else first
        t[name] = torch.zeros(t[name].shape, dtype=new, device=t[name].device)
    elif mutation == 'rank4':
        t[first] = t[first][0]
    elif mutation == 'rank6':
        t[second] = t[second][None]
    elif mutation == 'not_a_tensor':
        t[first] = t[first].tolist() if t[first].device.type != 'meta' else 3.0
    elif mutation == 'numpy_input':
        if t[second].device.type == 'cpu' and t[second].dtype != torch.bfloat16:
            t[second] = t[second].numpy()
        else:
            t[second] = None
    elif mutation == 'mixed_dtype':
        other = torch.float64 if t[first].dtype != torch.float64 else torch.float32
        t[second] = t[second].to(other)
    elif mutation == 'mixed_device':
        target = 'meta' if t[second].device.type != 'meta' else 'cpu'
        t[second] = torch.empty(t[second].shape, dtype=t[second].dtype, device=target)
    elif mutation == 'key_shape':
        t['key'] = t['key'][..., :-1, :] if width > 1 else t['key'][..., :1]
    elif mutation == 'value_shape':
        t['value'] = torch.cat([t['value'], t['value'][:, :, :1]], dim=2)
    elif mutation == 'attn_window':
        t['attn'] = torch.cat([t['attn'], t['attn'][..., :1]], dim=-1)
    elif mutation == 'attn_shape':
        t['attn'] = t['attn'][:, :, 1:] if height > 1 else t['attn'][..., :0, :]
    elif mutation == 'rpb_shape':
        ref = t['query']
        t['rpb'] = torch.zeros((heads + 1, 2 * ks[0] - 1, 2 * ks[1] - 1), dtype=ref.dtype,
                               device=ref.device)
    elif mutation == 'rpb_rank':
        ref = t['query']
        t['rpb'] = torch.zeros((2 * ks[0] - 1, 2 * ks[1] - 1), dtype=ref.dtype,
                               device=ref.device)
    elif mutation == 'rpb_dtype':
        ref = t['query']
        other = torch.float64 if ref.dtype != torch.float64 else torch.float32
        t['rpb'] = torch.zeros((heads, 2 * ks[0] - 1, 2 * ks[1] - 1), dtype=other,
                               device=ref.device)
    elif mutation == 'rpb_device':
        ref = t['query']
        target = 'meta' if ref.device.type != 'meta' else 'cpu'
        t['rpb'] = torch.zeros((heads, 2 * ks[0] - 1, 2 * ks[1] - 1), dtype=ref.dtype,
                               device=target)
    elif mutation == 'rpb_list':
        t['rpb'] = [[0.0]]
    elif mutation == 'scale_str':
        k['scale'] = '0.5'
    elif mutation == 'scale_bool':
        k['scale'] = True
    elif mutation == 'scale_tensor_list':
        k['scale'] = [0.5]
    else:  # pragma: no cover
        raise AssertionError(mutation)
    return t, k


def call(op_name, tensors, kwargs):
    if op_name == 'na2d_qk':
        return na2d_qk(tensors['query'], tensors['key'], rpb=tensors['rpb'], **kwargs)
    if op_name == 'na2d_av':
        return na2d_av(tensors['attn'], tensors['value'], **kwargs)
    return na2d(tensors['query'], tensors['key'], tensors['value'], rpb=tensors['rpb'],
                **kwargs)


# ------------------------------------------------------------------ expectations
def reference_and_bound(op_name, tensors, kwargs, case):
    """float64 reference and a per-element bound of the kernel's rounding error."""
    ks, dil = case['geo'][7], case['geo'][8]
    eps = EPS[case['dtype']]
    if op_name == 'na2d_qk':
        q, k, rpb = f64(tensors['query']), f64(tensors['key']), f64(tensors['rpb'])
        ref = reference.na2d_qk_reference(q, k, ks, dil, rpb)
        mag = reference.na2d_qk_reference(q.abs(), k.abs(), ks, dil,
                                          None if rpb is None else rpb.abs())
        return ref, 8 * eps * mag + 1e-300
    if op_name == 'na2d_av':
        a, v = f64(tensors['attn']), f64(tensors['value'])
        ref = reference.na2d_av_reference(a, v, ks, dil)
        mag = reference.na2d_av_reference(a.abs(), v.abs(), ks, dil)
        return ref, 8 * eps * mag + 1e-300
    q, k, v, rpb = (f64(tensors['query']), f64(tensors['key']), f64(tensors['value']),
                    f64(tensors['rpb']))
    dim = q.shape[-1]
    scale = kwargs['scale'] if kwargs['scale'] is not None else dim ** -0.5
    ref = reference.na2d_reference(q, k, v, ks, dil, rpb, scale)
    # error in the logits, amplified by the softmax, times the values' size
    logit_mag = reference.na2d_qk_reference(q.abs() * abs(scale), k.abs(), ks, dil,
                                            None if rpb is None else rpb.abs())
    logit_mag = logit_mag.amax(-1, keepdim=True) if logit_mag.shape[-1] else logit_mag
    value_mag = reference.na2d_av_reference(torch.ones_like(logit_mag).expand(
        *logit_mag.shape[:-1], ks[0] * ks[1]), v.abs(), ks, dil)
    return ref, 16 * eps * (1 + logit_mag) * value_mag + 1e-300


def check_valid(op_name, tensors, kwargs, out, case):
    batch, heads, height, width, dim, kernel, dilation, ks, dil = case['geo']
    window = ks[0] * ks[1]
    expected_shape = ((batch, heads, height, width, window) if op_name == 'na2d_qk'
                      else (batch, heads, height, width, dim))
    assert isinstance(out, torch.Tensor)
    assert tuple(out.shape) == expected_shape
    assert out.dtype == case['dtype']
    first = tensors['attn' if op_name == 'na2d_av' else 'query']
    assert out.device == first.device
    if out.device.type == 'meta' or out.numel() == 0:
        return
    ref64, bound = reference_and_bound(op_name, tensors, kwargs, case)
    got = out.detach().to('cpu', torch.float64)
    ref = ref64.to(case['dtype']).to(torch.float64)  # what an exact kernel returns
    # non-finite exactly where the math says (NaN: where the reference is NaN)
    ref_finite, got_finite = torch.isfinite(ref), torch.isfinite(got)
    mismatch = ref_finite != got_finite
    assert not mismatch.any(), (
        f'{int(mismatch.sum())} entries finite/non-finite unlike the reference, e.g. at '
        f'{mismatch.nonzero()[0].tolist()}: got {got[mismatch][:4].tolist()}, '
        f'reference {ref[mismatch][:4].tolist()}')
    nan_mismatch = torch.isnan(ref) != torch.isnan(got)
    assert not nan_mismatch.any(), (
        f'NaN where the reference has none (or the reverse) at '
        f'{nan_mismatch.nonzero()[0].tolist()}')
    inf = torch.isinf(ref)
    assert torch.equal(got[inf], ref[inf]), 'infinities of the wrong sign'
    if case['special'] == 'huge' and op_name == 'na2d':
        inputs_finite = all(torch.isfinite(t).all() for t in tensors.values()
                            if t is not None)
        if inputs_finite:
            assert torch.isfinite(got).all(), 'huge logits produced non-finite output'
    finite = ref_finite & torch.isfinite(bound)
    error = (got - ref64).abs()[finite]
    allowed = (bound + EPS[case['dtype']] * ref64.abs())[finite]
    worst = (error - allowed).max() if error.numel() else torch.tensor(-1.0)
    assert worst <= 0, (f'{op_name} differs from the reference by '
                        f'{float(error.max()):.3e} (allowed {float(allowed.max()):.3e})')


def check_grad(op_name, tensors, kwargs, case):
    """Backward of the op vs autograd through the float64 reference."""
    ks, dil = case['geo'][7], case['geo'][8]
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in tensors.items()
              if t is not None}
    full = dict(tensors, **leaves)
    out = call(op_name, full, kwargs)
    generator = torch.Generator().manual_seed(case['seed'] + 1)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    out.backward(grad_out.to(out.dtype).to(out.device))
    refs = {n: f64(t).requires_grad_(True) for n, t in leaves.items()}
    ref_full = dict({n: None for n in tensors}, **refs)
    if op_name == 'na2d_qk':
        ref_out = reference.na2d_qk_reference(ref_full['query'], ref_full['key'], ks, dil,
                                              ref_full['rpb'])
    elif op_name == 'na2d_av':
        ref_out = reference.na2d_av_reference(ref_full['attn'], ref_full['value'], ks, dil)
    else:
        scale = kwargs['scale'] if kwargs['scale'] is not None else \
            ref_full['query'].shape[-1] ** -0.5
        ref_out = reference.na2d_reference(ref_full['query'], ref_full['key'],
                                           ref_full['value'], ks, dil, ref_full['rpb'],
                                           scale)
    ref_out.backward(grad_out)
    rtol = {torch.float64: 1e-9, torch.float32: 1e-4}[case['dtype']]
    for name, leaf in leaves.items():
        assert leaf.grad is not None, f'no gradient for {name}'
        got = leaf.grad.to('cpu', torch.float64)
        want = refs[name].grad
        scale_ = max(1.0, float(want.abs().max()) if want.numel() else 1.0)
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale_,
                                   msg=lambda m: f'gradient of {name}: {m}')


def run_case(op_name, case):
    tensors, kwargs = build_args(op_name, case)
    if not case['valid']:
        tensors, kwargs = mutate(op_name, tensors, kwargs, case['mutation'], case)
        COUNTS[op_name]['invalid'] += 1
        with pytest.raises((TypeError, ValueError)) as info:
            call(op_name, tensors, kwargs)
        assert str(info.value), 'an error without a message'
        return
    COUNTS[op_name]['valid'] += 1
    dim = case['geo'][4]
    if dim == 0 and op_name == 'na2d' and kwargs.get('scale') is None:
        # no default scale for head_dim 0: a ValueError, not a ZeroDivisionError
        with pytest.raises(ValueError):
            call(op_name, tensors, kwargs)
        return
    out = call(op_name, tensors, kwargs)
    check_valid(op_name, tensors, kwargs, out, case)
    finite_inputs = all(bool(torch.isfinite(t).all()) for t in tensors.values()
                        if t is not None and t.device.type != 'meta')
    if (case['check_grad'] and case['dtype'] in (torch.float32, torch.float64)
            and case['special'] == 'none' and finite_inputs
            and case['device'] != 'meta' and out.numel() > 0):
        check_grad(op_name, tensors, kwargs, case)


# ------------------------------------------------------------------ the tests
@FUZZ
@given(case=cases('na2d_qk'))
def test_fuzz_na2d_qk(case):
    run_case('na2d_qk', case)


@FUZZ
@given(case=cases('na2d_av'))
def test_fuzz_na2d_av(case):
    run_case('na2d_av', case)


@FUZZ
@given(case=cases('na2d'))
def test_fuzz_na2d(case):
    run_case('na2d', case)


def test_fuzz_counts():
    """Each op saw >= 500 argument sets, both valid and invalid ones (runs last)."""
    for name, counts in COUNTS.items():
        if counts['valid'] + counts['invalid'] == 0:
            pytest.skip('run together with the fuzz tests')
        assert counts['valid'] + counts['invalid'] >= MAX_EXAMPLES, (name, counts)
        assert counts['valid'] >= 100 and counts['invalid'] >= 100, (name, counts)


# ------------------------------------------------------------------ targeted properties
def _neighbors(length, kernel, dilation):
    keys, _ = reference.axis_neighbors(length, kernel, dilation)
    return keys


@pytest.mark.parametrize('dilation', [1, 2])
def test_nan_key_poisons_exactly_its_neighborhood(dilation):
    """A NaN in one key: NaN logits exactly at the (query, neighbor) pairs that read it;
    the fused op's output is NaN exactly for the queries whose window holds it."""
    torch.manual_seed(0)
    height, width, kernel = 11, 10, 3
    q = torch.randn(1, 2, height, width, 4)
    k = torch.randn(1, 2, height, width, 4)
    v = torch.randn(1, 2, height, width, 4)
    pos = (4, 7)
    k[0, 1, pos[0], pos[1], 2] = float('nan')
    rows, cols = _neighbors(height, kernel, dilation), _neighbors(width, kernel, dilation)
    hits = (rows[:, :, None, None] == pos[0]) & (cols[None, None, :, :] == pos[1])
    # hits[i, m, j, n] -> expected mask [i, j, m*k+n]
    expected = hits.permute(0, 2, 1, 3).reshape(height, width, kernel * kernel)
    attn = na2d_qk(q, k, kernel, dilation)
    assert torch.equal(attn[0, 1].isnan(), expected)
    assert not attn[0, 0].isnan().any()
    out = na2d(q, k, v, kernel, dilation)
    poisoned = expected.any(-1)
    assert torch.equal(out[0, 1].isnan(), poisoned[..., None].expand(-1, -1, 4))
    assert not out[0, 0].isnan().any()
    assert 0 < int(poisoned.sum()) < height * width


def test_nan_value_poisons_one_channel():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 9, 9, 4) for _ in range(3))
    v[0, 0, 2, 3, 1] = float('nan')
    out = na2d(q, k, v, 3)
    assert out[..., 1].isnan().any()
    assert not out[..., [0, 2, 3]].isnan().any()


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_huge_logits_stay_finite(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 8, 8, 8)
    q = (q / q.norm(dim=-1, keepdim=True) * 200).to(dtype)  # |q.k| up to 4e4
    k = q.clone()
    v = torch.randn(2, 2, 8, 8, 8).to(dtype)
    out = na2d(q, k, v, 5, scale=0.5)  # logits ~1e4
    assert torch.isfinite(out).all()
    ref = reference.na2d_reference(f64(q), f64(k), f64(v), (5, 5), (1, 1), None, 0.5)
    torch.testing.assert_close(out.double(), ref, atol=EPS[dtype] * 20 * 8,
                               rtol=EPS[dtype] * 20)
    # the largest logit wins: the output is close to a one-hot pick
    assert out.abs().max() <= v.abs().max() * (1 + 1e-2)


def test_meta_tensors_give_shapes():
    q = torch.empty(2, 3, 10, 11, 8, device='meta')
    assert na2d(q, q, q, 5, 2).shape == q.shape
    assert na2d_qk(q, q, (3, 5), (3, 2)).shape == (2, 3, 10, 11, 15)
    attn = torch.empty(2, 3, 10, 11, 9, device='meta')
    assert na2d_av(attn, q, 3).shape == q.shape
