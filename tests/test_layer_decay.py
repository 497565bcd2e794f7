"""NATLayerDecayOptimizerConstructor: per-layer lr multipliers, custom_keys, registry."""
import warnings

import pytest
from torch import nn

from nat_mm.models import NAT
from nat_mm.optim import NATLayerDecayOptimizerConstructor
from test_backbone_utils import TINY_KWARGS

warnings.filterwarnings('ignore', message='nat_mm: ', category=RuntimeWarning)

LR, WD, RATE = 1e-3, 0.05, 0.5
OPTIM = dict(type='OptimWrapper',
             optimizer=dict(type='AdamW', lr=LR, betas=(0.9, 0.999), weight_decay=WD))
PARAMWISE = dict(decay_rate=RATE, custom_keys={'rpb': dict(decay_mult=0.),
                                               'norm': dict(decay_mult=0.)})


class ToyDetector(nn.Module):
    """backbone + neck, named like an mm detector."""

    def __init__(self, **backbone_kwargs):
        super().__init__()
        self.backbone = NAT(**dict(TINY_KWARGS, depths=(1, 2, 1, 1), **backbone_kwargs))
        self.neck = nn.ModuleDict(dict(fc=nn.Linear(256, 8), norm=nn.LayerNorm(8)))


def settings_by_name(model, optim_wrapper):
    """{parameter name: (lr, weight_decay)} of the built optimizer."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            out[names[id(p)]] = (group['lr'], group['weight_decay'])
    return out


def expected_lr(depth, num_layers=7):
    return LR * RATE**(num_layers - 1 - depth)


def test_layer_wise_multipliers_and_custom_keys():
    model = ToyDetector()
    wrapper = NATLayerDecayOptimizerConstructor(OPTIM, PARAMWISE)(model)
    got = settings_by_name(model, wrapper)
    assert len(got) == len(list(model.parameters()))
    cases = {  # name: (layer depth, decayed?)   depths (1, 2, 1, 1) -> num_layers 7
        'backbone.patch_embed.proj.0.weight': (0, True),
        'backbone.patch_embed.norm.weight': (0, False),
        'backbone.levels.0.blocks.0.attn.qkv.weight': (1, True),
        'backbone.levels.0.blocks.0.attn.qkv.bias': (1, True),
        'backbone.levels.0.blocks.0.attn.rpb': (1, False),
        'backbone.levels.0.downsample.reduction.weight': (2, True),
        'backbone.levels.0.downsample.norm.weight': (2, False),
        'backbone.levels.1.blocks.1.mlp.fc2.weight': (3, True),
        'backbone.levels.1.blocks.1.norm2.bias': (3, False),
        'backbone.norm1.weight': (3, False),
        'backbone.levels.3.blocks.0.attn.proj.weight': (5, True),
        'neck.fc.weight': (6, True),  # outside the backbone: full lr
        'neck.norm.weight': (6, False),
    }
    for name, (depth, decayed) in cases.items():
        lr, wd = got[name]
        assert lr == pytest.approx(expected_lr(depth)), name
        assert wd == (WD if decayed else 0.), name
    # merged: one group per (layer, lr, weight decay)
    assert len(wrapper.optimizer.param_groups) < len(got) / 2


def test_lr_mult_combines_and_frozen_params_are_left_out():
    model = ToyDetector(frozen_stages=1)
    paramwise = dict(PARAMWISE, custom_keys={'rpb': dict(lr_mult=2., decay_mult=0.)})
    got = settings_by_name(model, NATLayerDecayOptimizerConstructor(OPTIM, paramwise)(model))
    assert got['backbone.levels.1.blocks.0.attn.rpb'][0] == pytest.approx(2 * expected_lr(2))
    frozen = ('backbone.patch_embed', 'backbone.levels.0.', 'backbone.norm0')
    assert not any(n.startswith(frozen) for n in got)


def test_default_decay_rate_is_one_and_backbone_is_required():
    model = ToyDetector()
    got = settings_by_name(model, NATLayerDecayOptimizerConstructor(OPTIM)(model))
    assert {lr for lr, _ in got.values()} == {LR}
    with pytest.raises(TypeError, match='get_layer_depth'):
        NATLayerDecayOptimizerConstructor(OPTIM, PARAMWISE)(nn.Linear(2, 2))


def test_decay_type():
    model = ToyDetector()
    layer_wise = NATLayerDecayOptimizerConstructor(OPTIM, dict(PARAMWISE,
                                                               decay_type='layer_wise'))
    assert settings_by_name(model, layer_wise(model)) == settings_by_name(
        model, NATLayerDecayOptimizerConstructor(OPTIM, PARAMWISE)(model))
    with pytest.raises(ValueError, match="decay_type 'stage_wise' is not supported"):
        NATLayerDecayOptimizerConstructor(OPTIM, dict(PARAMWISE, decay_type='stage_wise'))


@pytest.mark.parametrize('package', ['mmdet', 'mmseg'])
def test_built_through_mm_registry(package):
    pytest.importorskip(package)
    import importlib

    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    registry = importlib.import_module(f'{package}.registry')
    import nat_mm.optim  # noqa: F401  (registers)
    assert (registry.OPTIM_WRAPPER_CONSTRUCTORS.get('NATLayerDecayOptimizerConstructor')
            is NATLayerDecayOptimizerConstructor)
    model = ToyDetector()
    cfg = dict(OPTIM, constructor='NATLayerDecayOptimizerConstructor',
               paramwise_cfg=PARAMWISE)
    with DefaultScope.overwrite_default_scope(package):
        wrapper = build_optim_wrapper(model, cfg)
    got = settings_by_name(model, wrapper)
    assert got['backbone.patch_embed.proj.0.weight'][0] == pytest.approx(expected_lr(0))
