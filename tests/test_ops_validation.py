"""Bad arguments raise a Python error naming the argument, before any kernel runs."""
import warnings

import pytest
import torch

from bad_op_calls import DIL, IDS, KS, bad_calls
from nat_mm.ops import backend_info, fallback, na2d, na2d_av, na2d_qk
from nat_mm.ops.library import op

SHAPE = (1, 2, 10, 12, 8)


def qkv(dtype=torch.float32):
    return [torch.randn(*SHAPE, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize('kernel_size, match', [
    (4, 'odd'), (1, 'odd'), ((3, 6), 'odd'), (-3, 'odd'), (0, 'odd'),
])
def test_bad_kernel_size(kernel_size, match):
    q, k, v = qkv()
    for call in (lambda: na2d(q, k, v, kernel_size), lambda: na2d_qk(q, k, kernel_size)):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize('kernel_size', [3.0, 'seven', (3, 3, 3), True, None])
def test_kernel_size_type(kernel_size):
    q, k, v = qkv()
    with pytest.raises(TypeError, match='kernel_size'):
        na2d(q, k, v, kernel_size)


@pytest.mark.parametrize('dilation', [0, -1, (1, 0)])
def test_bad_dilation(dilation):
    q, k, v = qkv()
    with pytest.raises(ValueError, match='dilation'):
        na2d(q, k, v, 3, dilation)


def test_map_smaller_than_window_says_how_much_to_pad():
    q, k, v = qkv()  # 10 x 12 map
    with pytest.raises(ValueError, match=r'pad it by 4 rows \(bottom\) and 2 columns'):
        na2d(q, k, v, 7, 2)
    with pytest.raises(ValueError, match='smaller than kernel_size'):
        na2d_qk(q, k, 11)


@pytest.mark.parametrize('shape', [(2, 10, 12, 8), (1, 1, 2, 10, 12, 8)])
def test_wrong_rank(shape):
    q = torch.randn(*shape)
    with pytest.raises(ValueError, match='query must be 5-D'):
        na2d(q, q, q, 3)


@pytest.mark.filterwarnings('ignore:The PyTorch API of nested tensors')
def test_nested_tensors_are_refused_by_name():
    q, k, v = qkv()
    nested = torch.nested.nested_tensor([q[0], q[0, :, :7]])
    attn = torch.nested.nested_tensor([torch.randn(2, 10, 12, 9)] * 2)
    for call, name in ((lambda: na2d(q, nested, v, 3), 'key'),
                       (lambda: na2d_qk(nested, k, 3), 'query'),
                       (lambda: na2d_av(attn, v, 3), 'attn')):
        with pytest.raises(TypeError, match=f'{name} is a nested tensor'):
            call()


def test_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match='key must have the shape of query'):
        na2d(q, k[:, :1], v, 3)
    with pytest.raises(ValueError, match='value must have the shape of query'):
        na2d(q, k, v[..., :4], 3)


def test_dtype_mismatch_and_integer_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match='key has dtype torch.float64'):
        na2d(q, k.double(), v, 3)
    with pytest.raises(TypeError, match='query must be a floating tensor'):
        na2d(q.long(), k, v, 3)
    with pytest.raises(TypeError, match='must be a torch.Tensor'):
        na2d(q.numpy(), k, v, 3)


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match='value is on meta'):
        na2d(q, k, v.to('meta'), 3)


def test_rpb_checks():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r'rpb must have shape .* \[2, 5, 5\]'):
        na2d(q, k, v, 3, rpb=torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match='rpb must be 3-D'):
        na2d(q, k, v, 3, rpb=torch.randn(5, 5))
    with pytest.raises(TypeError, match='rpb has dtype'):
        na2d_qk(q, k, 3, rpb=torch.randn(2, 5, 5, dtype=torch.float64))


def test_attn_checks():
    q, k, v = qkv()
    with pytest.raises(ValueError, match='attn last dim must be kernel_h\\*kernel_w = 9'):
        na2d_av(torch.randn(*SHAPE[:4], 25), v, 3)
    with pytest.raises(ValueError, match='attn and value must agree'):
        na2d_av(torch.randn(1, 2, 10, 11, 9), v, 3)


def test_scale_type_and_value():
    q, k, v = qkv()
    with pytest.raises(TypeError, match='scale'):
        na2d(q, k, v, 3, scale='0.1')
    for bad in (float('nan'), float('inf'), -float('inf')):
        with pytest.raises(ValueError, match='scale must be finite'):
            na2d(q, k, v, 3, scale=bad)
    assert torch.isfinite(na2d(q, k, v, 3, scale=0.0)).all()


@pytest.mark.parametrize('index', range(len(IDS)), ids=IDS)
def test_cpu_kernels_check_their_inputs(index):
    """The compiled kernels check their arguments too (raw op calls skip the Python layer)."""
    if backend_info()['cpu'] != 'compiled':
        pytest.skip('the compiled extension is not built')
    _, name, build, match, error = bad_calls('cpu')[index]
    with pytest.raises(error, match=match):
        op(name)(*build(torch.randn(1, 2, 9, 9, 8)))


@pytest.mark.parametrize('index', range(len(IDS)), ids=IDS)
def test_reference_fallback_checks_its_inputs(index):
    """The pure-PyTorch kernels that serve a device without compiled ones check raw op calls
    as the compiled kernels do (a wrong-shaped lse, say, would otherwise broadcast)."""
    _, name, build, match, error = bad_calls('cpu')[index]
    with pytest.raises(error, match=match):
        fallback._serving(name)(*build(torch.randn(1, 2, 9, 9, 8)))


# Calls with two faults: the first fault the checks meet decides the error's type, so the
# compiled checks, the fallback's and the fake kernels' must meet them in one order.
MAP_FAULTS = {'integer': lambda x: x.int(), 'float64': lambda x: x.double(),
              'rank': lambda x: x[0], 'meta': lambda x: x.to('meta'),
              'shape': lambda x: x[..., :-1], 'rank+integer': lambda x: x[0].int(),
              'meta+float64': lambda x: x.to('meta', torch.float64)}
BIAS_FAULTS = {'integer': lambda r: r.int(), 'float64': lambda r: r.double(),
               'rank': lambda r: r[0], 'meta': lambda r: r.to('meta'),
               'shape': lambda r: r[:, :3, :3], 'rank+float64': lambda r: r[0].double()}
LSE_FAULTS = {'integer': lambda x: x.int(), 'meta': lambda x: x.to('meta'),
              'shape': lambda x: x[..., :-1], 'meta+integer': lambda x: x.to('meta').int()}
PAIR_FAULTS = {'entries': lambda p: p[:1], 'value': lambda p: [0, 1]}


def _two_fault_calls():
    q, rpb, lse = torch.randn(1, 2, 9, 9, 8), torch.randn(2, 5, 5), torch.zeros(1, 2, 9, 9)
    attn = torch.randn(1, 2, 9, 9, 9)
    calls = {  # op: (good arguments, {argument index: its faults})
        'na2d_qk': ((q, q, rpb, KS, DIL),
                    {0: MAP_FAULTS, 1: MAP_FAULTS, 2: BIAS_FAULTS, 3: PAIR_FAULTS,
                     4: PAIR_FAULTS}),
        'na2d_av': ((attn, q, KS, DIL), {0: MAP_FAULTS, 1: MAP_FAULTS, 3: PAIR_FAULTS}),
        'na2d_fused_backward': ((q, q, q, q, rpb, q, lse, KS, DIL, 0.5, lse),
                                {0: MAP_FAULTS, 3: MAP_FAULTS, 5: MAP_FAULTS,
                                 6: LSE_FAULTS, 10: LSE_FAULTS}),
    }
    for name, (good, faults) in calls.items():
        singles = [(i, fault, make) for i, table in faults.items()
                   for fault, make in table.items()]
        for a, (i, fault_i, make_i) in enumerate(singles):
            for j, fault_j, make_j in singles[a + 1:]:
                if i != j:
                    args = list(good)
                    args[i], args[j] = make_i(args[i]), make_j(args[j])
                    yield f'{name}[{i}:{fault_i},{j}:{fault_j}]', name, args


def _outcome(call):
    try:
        call()
    except (TypeError, ValueError, RuntimeError) as error:
        return type(error).__name__
    return 'ok'


def test_every_path_raises_one_type_for_two_faults():
    """The compiled kernels (or, for meta tensors, the fake kernels) and the pure-PyTorch
    fallback raise the same error type for a call with two faults."""
    if backend_info()['cpu'] != 'compiled':
        pytest.skip('the compiled extension is not built')
    differ, count = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # the fallback's one warning
        for case, name, args in _two_fault_calls():
            count += 1
            compiled = _outcome(lambda: op(name)(*args))
            reference = _outcome(lambda: fallback._serving(name)(*args))
            if compiled != reference:
                differ.append(f'{case}: compiled {compiled}, fallback {reference}')
    assert count > 250 and not differ, '\n'.join(differ)


def test_reference_fallback_serves_good_calls_and_warns_once(monkeypatch):
    monkeypatch.setattr(fallback, '_warned', set())
    q, k, v = (torch.randn(1, 2, 9, 9, 8, dtype=torch.float64) for _ in range(3))
    lse = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match='slow pure-PyTorch reference'):
        attn = fallback._serving('na2d_qk')(q, k, None, [3, 3], [1, 1])
    torch.testing.assert_close(attn, fallback._qk(q, k, None, [3, 3], [1, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # once per device type
        got = fallback._serving('na2d_fused_backward')(q, q, k, v, None, q, lse, [3, 3],
                                                         [1, 1], 0.5, grad_lse=lse)
    want = fallback._fused_backward(q, q, k, v, None, q, lse, [3, 3], [1, 1], 0.5, lse)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # the scale is taken as it is, as the compiled kernels take it (NaN where they give NaN)
    args = (q, k, v, None, [3, 3], [1, 1], float('inf'))
    torch.testing.assert_close(fallback._serving('na2d_fused')(*args)[0],
                               op('na2d_fused')(*args)[0], equal_nan=True)


def _one_arg_on_meta(args):
    """The argument lists with one tensor argument moved to the meta device, each."""
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor):
            yield [a.to('meta') if j == i else a for j, a in enumerate(args)]


def test_raw_calls_mixing_meta_and_real_tensors_are_refused():
    """Meta outranks CPU in dispatch, so such a call reaches the fake kernel: it must raise,
    not return uninitialised CPU tensors."""
    q = torch.randn(1, 2, 9, 9, 8)
    attn, lse, rpb = torch.randn(1, 2, 9, 9, 9), torch.zeros(1, 2, 9, 9), torch.randn(2, 5, 5)
    calls = {
        'na2d_qk': (q, q, rpb, KS, DIL), 'na2d_av': (attn, q, KS, DIL),
        'na2d_inverse': (attn, q, KS, DIL), 'na2d_fused': (q, q, q, rpb, KS, DIL, 0.5),
        'na2d_fused_backward': (q, q, q, q, rpb, q, lse, KS, DIL, 0.5, lse),
    }
    for name, args in calls.items():
        for mixed in _one_arg_on_meta(args):
            with pytest.raises(ValueError, match='move them to one device'):
                op(name)(*mixed)
        all_meta = [a.to('meta') if isinstance(a, torch.Tensor) else a for a in args]
        for got, real in zip(torch.utils._pytree.tree_leaves(op(name)(*all_meta)),
                             torch.utils._pytree.tree_leaves(op(name)(*args))):
            assert got.device.type == 'meta' and got.shape == real.shape
