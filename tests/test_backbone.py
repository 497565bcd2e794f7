"""NAT / DiNAT backbone: structure, shapes, any input size, training knobs, init."""
import warnings

import pytest
import torch
from mmengine.model import BaseModule
from torch import nn

from nat_mm.models import DiNAT, NAT
from nat_mm.models.attention import NeighborhoodAttention
from nat_mm.models.presets import DILATION_PRESETS, resolve_dilations
from attention_reference import upstream_attention
from test_backbone_utils import TINY_KWARGS, padded_dinat

warnings.filterwarnings('ignore', message='nat_mm: ', category=RuntimeWarning)

# Published classification parameter counts (NAT_REFERENCE.md §2) and their rounding.
PUBLISHED_PARAMS = {('NAT', 'mini'): (19.98e6, 5e3), ('NAT', 'tiny'): (27.90e6, 5e3),
                    ('NAT', 'small'): (50.74e6, 5e3), ('NAT', 'base'): (89.77e6, 5e3),
                    ('DiNAT', 'large'): (200.9e6, 5e4)}


def conv_out(size: int) -> int:  # 3x3, stride 2, padding 1
    return (size - 1) // 2 + 1


def expected_sizes(height: int, width: int):
    sizes, h, w = [], conv_out(conv_out(height)), conv_out(conv_out(width))
    for _ in range(4):
        sizes.append((h, w))
        h, w = conv_out(h), conv_out(w)
    return sizes


def build(cls=NAT, **kwargs):
    return cls(**dict(TINY_KWARGS, **kwargs))


# ---------------------------------------------------------------- structure
def test_is_an_mmengine_base_module():
    assert issubclass(NAT, BaseModule) and issubclass(DiNAT, NAT)


@pytest.mark.parametrize('cls,arch', list(PUBLISHED_PARAMS))
def test_param_count_matches_upstream(cls, arch):
    kwargs = dict(dilations='coco') if cls == 'DiNAT' else {}
    with torch.device('meta'):  # no memory, no init: only shapes matter
        model = {'NAT': NAT, 'DiNAT': DiNAT}[cls](arch=arch, **kwargs)
    count = sum(p.numel() for p in model.parameters())
    last = model.num_features[-1]
    published, rounding = PUBLISHED_PARAMS[(cls, arch)]
    # classification model = backbone - 4 output norms + final norm + 1000-way head
    expected = published - (last * 1000 + 1000) - 2 * last + 2 * sum(model.num_features)
    assert abs(count - expected) <= rounding


def test_parameter_names_are_upstream():
    names = set(dict(build(layer_scale=1e-5).named_parameters()))
    for name in ['patch_embed.proj.0.weight', 'patch_embed.proj.1.bias',
                 'patch_embed.norm.weight', 'levels.0.blocks.0.norm1.weight',
                 'levels.0.blocks.0.attn.qkv.weight', 'levels.0.blocks.0.attn.rpb',
                 'levels.0.blocks.0.attn.proj.bias', 'levels.0.blocks.0.norm2.bias',
                 'levels.0.blocks.0.mlp.fc1.weight', 'levels.0.blocks.0.mlp.fc2.bias',
                 'levels.0.blocks.0.gamma1', 'levels.0.blocks.0.gamma2',
                 'levels.2.downsample.reduction.weight', 'levels.2.downsample.norm.bias',
                 'norm0.weight', 'norm3.bias']:
        assert name in names, name
    assert not any(n.startswith('levels.3.downsample') for n in names)
    assert 'levels.0.downsample.reduction.bias' not in names


@pytest.mark.parametrize('arch', ['mini', 'tiny', 'small', 'base'])
def test_arch_output_shapes(arch):
    model = NAT(arch=arch).eval()
    c = model.embed_dims
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, c * 2**i, 8 // 2**i or 1, 8 // 2**i or 1)
                                              for i in range(4)]


def test_dinat_large_output_shapes():
    model = DiNAT(arch='large', depths=(1, 1, 2, 1), dilations='imagenet').eval()
    assert [b.attn.dilation for b in model.levels[2].blocks] == [1, 2]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [192, 384, 768, 1536]
    with pytest.raises(ValueError, match='arch'):
        NAT(arch='large')


@pytest.mark.parametrize('size', [(511, 511), (112, 137), (64, 64), (32, 32), (20, 9)])
def test_any_input_size(size):
    model = build().eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    assert [tuple(o.shape[2:]) for o in outs] == expected_sizes(*size)
    assert [o.shape[1] for o in outs] == [32, 64, 128, 256]
    assert all(torch.isfinite(o).all() and o.is_contiguous() for o in outs)


def test_strides_on_divisible_input():
    outs = build().eval()(torch.randn(1, 3, 128, 96))
    assert [(128 // o.shape[2], 96 // o.shape[3]) for o in outs] == [(4, 4), (8, 8),
                                                                      (16, 16), (32, 32)]


def test_out_indices_subset():
    model = build(out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [64, 256]
    assert not hasattr(model, 'norm0') and hasattr(model, 'norm3')
    with pytest.raises(ValueError):
        build(out_indices=(4, ))
    assert build(out_indices=(0, -1)).out_indices == (0, 3)
    assert build(out_indices=-2).out_indices == (2, )


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(out_indices=(3, 0)), ValueError, 'increasing order'),
    (dict(out_indices=(1, 1)), ValueError, 'distinct levels'),
    (dict(out_indices=(0, -4)), ValueError, 'distinct levels'),
    (dict(out_indices=()), ValueError, 'distinct levels'),
    (dict(out_indices=1.0), TypeError, 'out_indices must be an int or a sequence'),
    (dict(kernel_size=4), ValueError, 'kernel_size must be an odd int >= 3'),
    (dict(kernel_size=7.0), ValueError, 'kernel_size must be an odd int >= 3'),
    (dict(kernel_size=[7, 7, 7, 7]), ValueError, 'one square window for every level'),
    (dict(dilations=2), TypeError, 'dilations must be None, a preset name or per-level'),
    (dict(dilations=[1, 1, 1, 1]), TypeError, 'per-level lists'),
], ids=lambda x: str(x) if not isinstance(x, type) else '')
def test_bad_constructor_arguments_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        build(**kwargs)


def test_outputs_are_normed_pre_downsample_levels():
    model = build().eval()
    x = torch.randn(1, 3, 32, 32)
    h = model.patch_embed(x)
    outs = model(x)
    for i, level in enumerate(model.levels):
        for block in level.blocks:
            h = block(h)
        torch.testing.assert_close(outs[i], getattr(model, f'norm{i}')(h).permute(0, 3, 1, 2))
        if level.downsample is not None:
            h = level.downsample(h)


# ---------------------------------------------------------------- attention math
@pytest.mark.parametrize('size,dilation', [((9, 10), 1), ((4, 6), 1), ((3, 5), 2),
                                            ((10, 12), 2)])
def test_attention_matches_upstream_math_incl_padding(size, dilation):
    torch.manual_seed(0)
    layer = NeighborhoodAttention(32, 2, kernel_size=5, dilation=dilation).eval()
    x = torch.randn(2, *size, 32)
    torch.testing.assert_close(layer(x), upstream_attention(layer, x), atol=1e-5, rtol=1e-4)


def test_attention_dropout_uses_unfused_path_with_same_math():
    torch.manual_seed(0)
    layer = NeighborhoodAttention(32, 2, kernel_size=3, attn_drop_rate=0.5)
    x = torch.randn(1, 5, 6, 32)
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))  # dropout acts while training
    layer.train().attn_drop.forward = lambda attn: attn  # unfused path, no dropout
    torch.testing.assert_close(layer(x), layer.eval()(x), atol=1e-5, rtol=1e-4)


def test_mixed_precision_autocast():
    model = build(attn_drop_rate=0.1).train()  # fused and unfused paths
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(torch.randn(1, 3, 32, 32))
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    rpb = model.levels[0].blocks[0].attn.rpb
    assert rpb.dtype == rpb.grad.dtype == torch.float32 and rpb.grad.abs().sum() > 0
    model.eval()
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32))[0].dtype == torch.bfloat16


# ---------------------------------------------------------------- DiNAT / dilations
def test_dinat_dilation_presets():
    assert resolve_dilations('coco', (3, 4, 6, 5)) == [[1, 28, 1], [1, 7, 1, 14],
                                                       [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
    assert resolve_dilations('ade', (3, 4, 18, 5))[2] == [1, 2, 1, 3, 1, 4] * 3
    assert resolve_dilations(None, (1, 2)) == [[1], [1, 1]]
    assert set(DILATION_PRESETS) >= {'coco', 'ade', 'imagenet', 'imagenet384'}
    model = DiNAT(arch='mini', dilations='ade')
    assert [b.attn.dilation for b in model.levels[1].blocks] == [1, 4, 1, 8]
    with pytest.raises(ValueError, match='dilations'):
        DiNAT(arch='mini')
    with pytest.raises(ValueError, match='preset'):
        NAT(arch='mini', dilations='voc')
    with pytest.raises(ValueError, match='one value per block'):
        NAT(arch='mini', dilations=[[1], [1], [1], [1]])


def test_dinat_dilation_larger_than_map_pads():
    # level 0 is 8x8 with dilation 9 (runs padded to 27x27), level 1 4x4 with dilation 5
    model = build(DiNAT, kernel_size=3, depths=(2, 2, 1, 1),
                  dilations=[[1, 9], [5, 1], [2], [1]])
    outs = model(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape[2:]) for o in outs] == expected_sizes(32, 32)
    sum(o.sum() for o in outs).backward()
    assert model.levels[0].blocks[1].attn.rpb.grad.abs().sum() > 0


# ---------------------------------------------------------------- graph capture
def test_compile_fullgraph_forward_and_backward():
    """The whole backbone (padding, dilation, fused op) is one graph for torch.compile."""
    model = padded_dinat()
    x = torch.randn(1, 3, 40, 56)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    eager_outs, outs = model(x), compiled(x)
    for got, want in zip(outs, eager_outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(sum(o.square().sum() for o in eager_outs), params)
    got = torch.autograd.grad(sum(o.square().sum() for o in outs), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_inductor_dynamic_shapes_inference():
    """torch.compile(dynamic=True) with inductor: one compiled graph serves other sizes of
    the same padding regime. Fails without the downsampler's copy under symbolic sizes
    (inductor's convolution lowering cannot simplify the permuted view's strides)."""
    model = padded_dinat().eval()
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for size in [(64, 96), (64, 112)]:  # the second must not recompile
            x = torch.randn(2, 3, *size)
            with torch._dynamo.config.patch(error_on_recompile=size != (64, 96)):
                outs = compiled(x)
            for got, want in zip(outs, model(x)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- training knobs
def _frozen(module: nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 4])
def test_frozen_stages(frozen_stages):
    model = build(frozen_stages=frozen_stages, drop_rate=0.1)
    model.train()  # must not unfreeze
    assert _frozen(model.patch_embed) == (frozen_stages >= 0)
    assert _frozen(model.pos_drop) == (frozen_stages >= 0)  # frozen levels see no dropout
    for i in range(4):
        assert _frozen(model.levels[i]) == (i < frozen_stages)
        assert _frozen(getattr(model, f'norm{i}')) == (i < frozen_stages)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert bool(trainable) == (frozen_stages < 4)


def test_norm_eval_keeps_norms_in_eval_mode():
    model = build(norm_eval=True).train()
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and not any(m.training for m in norms)
    assert model.levels[0].blocks[0].mlp.training
    assert all(m.training for m in build(norm_eval=False).train().modules())


def test_with_cp_gives_identical_outputs_and_grads():
    torch.manual_seed(0)
    plain = build(drop_path_rate=0.3, drop_rate=0.1)
    ckpt = build(drop_path_rate=0.3, drop_rate=0.1, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    results = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(1)
        outs = model(x)
        sum((o * o).sum() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5)
    assert all(b.with_cp for level in ckpt.levels for b in level.blocks)


# ---------------------------------------------------------------- init
def test_init_weights_from_scratch():
    model = NAT(arch='mini', depths=(1, 1, 2, 1))
    for p in model.parameters():
        nn.init.constant_(p, 3.)
    model.init_weights()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - .02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    assert all((m.bias == 0).all() for m in linears)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)
    rpb = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith('rpb')])
    assert abs(rpb.std().item() - .02) < 2e-3 and rpb.abs().max() < 2
    assert model.is_init


def test_layer_scale_init_value():
    model = NAT(arch=None, embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                mlp_ratio=2., layer_scale=1e-5)
    assert (model.levels[2].blocks[0].gamma2 == 1e-5).all()
    assert not hasattr(NAT(arch='mini').levels[0].blocks[0], 'gamma1')


def test_pretrained_is_a_deprecated_alias():
    with pytest.warns(UserWarning, match='deprecated'):
        model = build(pretrained='some.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='some.pth')
    with pytest.raises(ValueError):
        build(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='b.pth'))


def test_arch_selection_and_overrides():
    model = NAT(arch='small', depths=(1, 1, 1, 1))
    assert (model.embed_dims, model.depths, model.num_heads) == (96, (1, 1, 1, 1),
                                                                 (3, 6, 12, 24))
    assert model.levels[0].blocks[0].layer_scale == 1e-5
    with pytest.raises(ValueError, match='unknown arch'):
        NAT(arch='huge')
    with pytest.raises(ValueError, match='miss'):
        NAT(arch=None, embed_dims=32)


@pytest.mark.parametrize('layer_scale', ['absent', None, 1e-5])
def test_arch_dict(layer_scale):
    arch = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), mlp_ratio=1.0)
    if layer_scale != 'absent':
        arch['layer_scale'] = layer_scale
    model = NAT(arch=arch)
    assert (model.embed_dims, model.depths, model.num_heads) == (16, (1, 1, 1, 1),
                                                                 (1, 1, 2, 2))
    block = model.levels[0].blocks[0]
    assert block.layer_scale == (None if layer_scale == 'absent' else layer_scale)
    assert hasattr(block, 'gamma1') == (layer_scale == 1e-5)


def test_get_layer_depth():
    model = build(depths=(1, 2, 1, 1))  # 5 blocks -> num_layers 7
    depth = model.get_layer_depth
    assert depth('patch_embed.proj.0.weight') == (0, 7)
    assert depth('levels.0.blocks.0.attn.rpb') == (1, 7)
    assert depth('levels.1.blocks.1.mlp.fc1.weight') == (3, 7)
    assert depth('levels.3.blocks.0.gamma1') == (5, 7)
    assert depth('levels.0.downsample.reduction.weight') == (2, 7)  # with levels.1.blocks.0
    assert depth('levels.1.downsample.norm.bias') == (4, 7)
    assert depth('norm1.weight') == (3, 7)  # with the last block of level 1
    assert depth('norm3.bias') == (5, 7)
    assert depth('backbone.levels.0.blocks.0.norm1.weight', 'backbone.') == (1, 7)
    assert depth('neck.conv.weight', 'backbone.') == (6, 7)
