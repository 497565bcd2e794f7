"""nat_mm.natten_compat: NATTEN <= 0.17's 2D API (names, signatures, layouts, parameter
names) on nat_mm's ops, checked against the pure-PyTorch reference."""
import subprocess
import sys
import textwrap

import pytest
import torch

import nat_mm.natten_compat as natten
from attention_reference import upstream_attention
from nat_mm.models.layers import NATBlock
from nat_mm.ops import na2d_av_reference, na2d_qk_reference, na2d_reference
from nat_mm.natten_compat import functional as F
from nat_mm.ops.validation import as_pair


def _inputs(*shapes, dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


@pytest.mark.parametrize('kernel,dilation', [(5, 1), (3, 2), ((3, 5), (2, 1))])
def test_unfused_functions_match_reference(kernel, dilation):
    q, k, value = _inputs(*[(2, 3, 11, 13, 8)] * 3)
    (kh, kw), pairs = as_pair(kernel, 'k'), (as_pair(kernel, 'k'), as_pair(dilation, 'd'))
    rpb, = _inputs((3, 2 * kh - 1, 2 * kw - 1))
    expected = na2d_qk_reference(q, k, *pairs, rpb)
    torch.testing.assert_close(F.na2d_qk(q, k, kernel, dilation, rpb=rpb), expected)
    no_bias = na2d_qk_reference(q, k, *pairs)
    torch.testing.assert_close(F.na2d_qk(q, k, kernel, dilation), no_bias)
    weights = expected.softmax(-1)
    expected_out = na2d_av_reference(weights, value, *pairs)
    torch.testing.assert_close(F.na2d_av(weights, value, kernel, dilation), expected_out)
    if isinstance(kernel, int):  # NATTEN <= 0.16 names: square kernel and dilation
        torch.testing.assert_close(F.natten2dqkrpb(q, k, rpb, kernel, dilation), expected)
        torch.testing.assert_close(F.natten2dqk(q, k, kernel, dilation), no_bias)
        torch.testing.assert_close(F.natten2dav(weights, value, kernel, dilation),
                                   expected_out)


@pytest.mark.parametrize('kernel,dilation,scale', [(3, 1, None), ((5, 3), (1, 2), 0.3),
                                                    (3, 2, 0.0)])
def test_fused_heads_last_matches_reference_forward_and_gradients(kernel, dilation, scale):
    # NATTEN's fused layout is [B, H, W, heads, D]; scale 0 / None mean D ** -0.5 there
    q, k, v = _inputs(*[(2, 12, 9, 3, 4)] * 3)
    (kh, kw), pairs = as_pair(kernel, 'k'), (as_pair(kernel, 'k'), as_pair(dilation, 'd'))
    rpb, = _inputs((3, 2 * kh - 1, 2 * kw - 1))
    out = F.na2d(q, k, v, kernel, dilation, rpb=rpb, scale=scale)
    heads_first = [t.permute(0, 3, 1, 2, 4) for t in (q, k, v)]
    expected = na2d_reference(*heads_first, *pairs, rpb, scale or 4 ** -0.5)
    expected = expected.permute(0, 2, 3, 1, 4)
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected)
    for got, want in zip(_grads(out, (q, k, v, rpb)), _grads(expected, (q, k, v, rpb))):
        torch.testing.assert_close(got, want)


def test_fused_heads_last_gradcheck():
    q, k, v = _inputs(*[(1, 7, 6, 2, 3)] * 3)
    rpb, = _inputs((2, 5, 5))
    assert torch.autograd.gradcheck(lambda *t: F.na2d(*t[:3], 3, 2, rpb=t[3]),
                                    (q, k, v, rpb))


@pytest.mark.filterwarnings('ignore:The PyTorch API of nested tensors')
def test_unsupported_features_raise_and_name_the_argument():
    q, k, v = (torch.randn(1, 2, 8, 8, 4) for _ in range(3))
    weights = torch.randn(1, 2, 8, 8, 9)
    with pytest.raises(NotImplementedError, match='is_causal'):
        F.na2d_qk(q, k, 3, is_causal=True)
    with pytest.raises(NotImplementedError, match='is_causal'):
        F.na2d_av(weights, v, 3, is_causal=(False, True))
    with pytest.raises(NotImplementedError, match='additional_keys'):
        F.na2d_qk(q, k, 3, additional_keys=torch.randn(1, 2, 4, 4))
    with pytest.raises(NotImplementedError, match='additional_values'):
        F.na2d_av(weights, v, 3, additional_values=torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r'query must be 5-D \[B, H, W, heads, D\]'):
        F.na2d(q[0], k, v, 3)
    nested = torch.nested.nested_tensor([q[0], q[0, :, :7]])
    with pytest.raises(TypeError, match=r'query is a nested tensor.*unbind\(\)'):
        F.na2d(nested, nested, nested, 3)
    with pytest.raises(TypeError, match='query is a nested tensor'):
        F.na2d_qk(nested, nested, 3)
    with pytest.raises(AttributeError, match='2D neighborhood attention only'):
        F.na3d_qk
    with pytest.raises(AttributeError, match='no attribute'):
        F.not_a_natten_name
    F.na2d_qk(q, k, 3, is_causal=(False, False))  # non-causal spelled as a tuple is fine


def _natten_state_shapes(dim, heads, kh, kw, rpb=True, qkv_bias=True):
    shapes = {'qkv.weight': (3 * dim, dim), 'qkv.bias': (3 * dim, ), 'proj.weight': (dim, dim),
              'proj.bias': (dim, ), 'rpb': (heads, 2 * kh - 1, 2 * kw - 1)}
    if not rpb:
        del shapes['rpb']
    if not qkv_bias:
        del shapes['qkv.bias']
    return shapes


@pytest.mark.parametrize('kwargs,rpb', [({}, True), (dict(bias=True), True),
                                        (dict(rel_pos_bias=False), False),
                                        (dict(bias=False), False)])
def test_module_parameters_have_natten_names_and_shapes(kwargs, rpb):
    module = natten.NeighborhoodAttention2D(dim=48, num_heads=3, kernel_size=(5, 3),
                                            **kwargs)
    shapes = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    assert shapes == _natten_state_shapes(48, 3, 5, 3, rpb=rpb)
    module = natten.NeighborhoodAttention2D(48, 3, 7, 2, qkv_bias=False)
    assert set(module.state_dict()) == set(_natten_state_shapes(48, 3, 7, 7, qkv_bias=False))
    assert module.head_dim == 16 and module.scale == 16 ** -0.5


def test_module_rejects_what_it_cannot_honour():
    with pytest.raises(ValueError, match='bias=True and rel_pos_bias=False disagree'):
        natten.NeighborhoodAttention2D(32, 2, 3, bias=True, rel_pos_bias=False)
    with pytest.raises(NotImplementedError, match='is_causal'):
        natten.NeighborhoodAttention2D(32, 2, 3, is_causal=True)
    with pytest.raises(TypeError, match='positional'):  # the generations order these apart
        natten.NeighborhoodAttention2D(32, 2, 3, 1, True)
    with pytest.raises(ValueError, match='kernel_size must be odd'):
        natten.NeighborhoodAttention2D(32, 2, 4)


@pytest.mark.parametrize('size,kwargs', [
    ((9, 10), dict(kernel_size=5)),
    ((3, 4), dict(kernel_size=5)),  # smaller than the window: padded, then cropped
    ((7, 11), dict(kernel_size=(3, 5), dilation=(2, 1), qk_scale=0.1)),
    ((6, 8), dict(kernel_size=3, dilation=2, rel_pos_bias=False)),
])
def test_module_matches_natten_math(size, kwargs):
    torch.manual_seed(0)
    module = natten.NeighborhoodAttention2D(dim=32, num_heads=2, **kwargs).eval()
    x = torch.randn(2, *size, 32)
    torch.testing.assert_close(module(x), upstream_attention(module, x), atol=1e-5,
                               rtol=1e-4)


def test_switches_are_recorded_with_natten_defaults_and_change_nothing(monkeypatch):
    monkeypatch.setattr(natten.context, '_STATE', dict(natten.context._STATE))
    assert not natten.is_fused_na_enabled() and not natten.is_fna_enabled()  # 0.17: off
    torch.manual_seed(0)
    module = natten.NeighborhoodAttention2D(32, 2, 5, 2).eval()
    x = torch.randn(1, 10, 12, 32)
    before = module(x)
    natten.use_fused_na(mode=True, kv_parallel=True)
    assert natten.is_fused_na_enabled() and natten.is_kv_parallelism_in_fused_na_enabled()
    natten.use_kv_parallelism_in_fused_na(False)
    natten.set_memory_usage_preference('unrestricted')
    natten.use_autotuner(forward_pass=True)
    assert not natten.is_kv_parallelism_in_fused_na_enabled() and natten.is_autotuner_enabled()
    assert natten.is_autotuner_enabled_for_forward()
    assert not natten.is_autotuner_enabled_for_backward()
    assert natten.get_memory_usage_preference() is natten.MemoryUsagePreference.Unrestricted
    assert natten.is_memory_usage_unrestricted() and not natten.is_memory_usage_default()
    # libnatten's kernel switches: on by default, recorded, and the older forms return them
    for use, enabled, enable, disable in [
            (natten.use_tiled_na, natten.is_tiled_na_enabled, natten.enable_tiled_na,
             natten.disable_tiled_na),
            (natten.use_gemm_na, natten.is_gemm_na_enabled, natten.enable_gemm_na,
             natten.disable_gemm_na),
            (natten.use_tf32_in_gemm_na, natten.is_tf32_in_gemm_na_enabled, natten.enable_tf32,
             natten.disable_tf32)]:
        assert enabled()
        use(False)
        assert not enabled() and enable() and enabled() and not disable()
    torch.testing.assert_close(module(x), before, atol=0, rtol=0)
    natten.disable_autotuner()
    assert not natten.is_autotuner_enabled()
    natten.use_fused_na(mode=False)
    assert not natten.is_fused_na_enabled()
    with pytest.raises(ValueError, match='pref must be one of'):
        natten.set_memory_usage_preference('lots')
    assert natten.has_cuda() == (torch.cuda.is_available()
                                 and natten.context.backend_info().get('cuda') == 'compiled')


def test_natten_argument_conventions():
    # `dilation or 1`, `qk_scale or head_dim ** -0.5`, and the bias cast to q's dtype
    torch.manual_seed(0)
    plain = natten.NeighborhoodAttention2D(32, 2, 3)
    spelled = natten.NeighborhoodAttention2D(32, 2, 3, dilation=None, qk_scale=0.0)
    spelled.load_state_dict(plain.state_dict())
    x = torch.randn(1, 6, 7, 32)
    assert spelled.dilation == 1 and spelled.scale == 16 ** -0.5
    torch.testing.assert_close(spelled(x), plain(x))
    q, k, v = (torch.randn(1, 6, 7, 2, 8, dtype=torch.bfloat16) for _ in range(3))
    rpb = torch.randn(2, 5, 5)  # float32 parameter, bfloat16 q/k/v, no autocast
    heads_first = [t.permute(0, 3, 1, 2, 4).double() for t in (q, k, v)]
    want = na2d_reference(*heads_first, (3, 3), (1, 1), rpb.double(), 8 ** -0.5)
    got = F.na2d(q, k, v, 3, rpb=rpb)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want.permute(0, 2, 3, 1, 4), atol=5e-2, rtol=5e-2)
    assert F.na2d_qk(heads_first[0].bfloat16(), heads_first[1].bfloat16(), 3,
                     rpb=rpb).dtype == torch.bfloat16


def test_module_reads_kernel_size_and_dilation_when_called():
    torch.manual_seed(0)
    module = natten.NeighborhoodAttention2D(16, 2, 3).eval()
    module.dilation = 4  # set after construction: the window is 12 now, the map padded
    x = torch.randn(1, 8, 9, 16)
    torch.testing.assert_close(module(x), upstream_attention(module, x), atol=1e-5,
                               rtol=1e-4)
    with pytest.raises(ValueError, match=r'x must be 4-D channels-last \[B, H, W, C\]'):
        module(x[0])


def test_nat_block_attention_weights_load_into_the_natten_module():
    # the names that NAT/DiNAT checkpoints (trained on NATTEN) use for their attention
    block = NATBlock(64, 2, kernel_size=7, dilation=2).eval()
    module = natten.NeighborhoodAttention2D(64, 2, kernel_size=7, dilation=2).eval()
    module.load_state_dict(block.attn.state_dict(), strict=True)
    x = torch.randn(1, 15, 16, 64)
    torch.testing.assert_close(module(x), block.attn(x))


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_install_makes_import_natten_work_without_mmengine():
    # NATTEN-era code imports natten; the GPU machines have no mm packages
    out = _run('''
        import sys
        sys.modules['mmengine'] = None  # as if mmengine were not installed
        import nat_mm.natten_compat
        assert nat_mm.natten_compat.install() is nat_mm.natten_compat.install()
        import natten
        from natten import NeighborhoodAttention2D
        from natten.functional import natten2dqkrpb, natten2dav
        import natten.functional
        from natten.context import is_fna_enabled
        import torch
        from nat_mm.models.layers import NATBlock
        assert natten is nat_mm.natten_compat
        assert natten.functional is nat_mm.natten_compat.functional
        assert not is_fna_enabled()
        NATBlock(32, 2, kernel_size=3)  # the layers build without mmengine's registry
        y = NeighborhoodAttention2D(dim=32, num_heads=2, kernel_size=3)(
            torch.randn(1, 5, 5, 32))
        print(tuple(y.shape))
        try:
            import nat_mm.models
            nat_mm.models.NAT
        except ImportError as e:
            print(e)
    ''')
    assert '(1, 5, 5, 32)' in out
    assert 'nat_mm.models.NAT needs mmengine' in out


def test_install_refuses_to_shadow_an_imported_natten():
    out = _run('''
        import sys, types
        sys.modules['natten'] = types.ModuleType('natten')
        import nat_mm.natten_compat
        try:
            nat_mm.natten_compat.install()
        except RuntimeError as e:
            print(e)
    ''')
    assert 'another natten is already imported' in out
