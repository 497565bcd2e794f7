"""Layer-wise learning-rate decay for NAT / DiNAT backbones.

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
        constructor='NATLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(decay_rate=0.9,
                           custom_keys={'rpb': dict(decay_mult=0.),
                                        'norm': dict(decay_mult=0.)}))

A parameter of the backbone at depth d (``backbone.get_layer_depth``; num_layers =
sum(depths) + 2) gets lr * decay_rate ** (num_layers - 1 - d): the stem decays most,
the last block least, and parameters outside the backbone (neck, heads) keep lr.
Everything else in ``paramwise_cfg`` (custom_keys, norm_decay_mult, bias_decay_mult,
...) works as in mmengine's DefaultOptimWrapperConstructor; its lr_mult multiplies the
layer multiplier.
"""
from typing import Dict, List, Optional, Tuple

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

OWN_KEYS = ('decay_rate', )


def find_layered_module(model: nn.Module) -> Tuple[str, Optional[nn.Module]]:
    """(name, module) of the first module with ``get_layer_depth``, e.g. the backbone."""
    for name, module in model.named_modules():
        if callable(getattr(module, 'get_layer_depth', None)):
            return name, module
    return '', None


class NATLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """DefaultOptimWrapperConstructor plus a per-layer lr multiplier (``decay_rate``).

    Parameter groups with equal settings are merged, so the optimizer holds one
    group per (layer, lr, weight decay) combination.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        self.decay_rate = float(paramwise_cfg.pop('decay_rate', 1.))
        decay_type = paramwise_cfg.pop('decay_type', 'layer_wise')
        if decay_type != 'layer_wise':  # e.g. ConvNeXt's 'stage_wise' of mmdet configs
            raise ValueError(f"paramwise_cfg decay_type {decay_type!r} is not supported by "
                             f"{type(self).__name__}: only 'layer_wise' (one lr per "
                             f"block, NAT's get_layer_depth)")
        # An empty paramwise_cfg would make the parent skip add_params entirely.
        paramwise_cfg.setdefault('custom_keys', {})
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = '',
                   is_dcn_module=None) -> None:
        if prefix:  # the parent's recursion into children
            return super().add_params(params, module, prefix, is_dcn_module)
        if self.base_lr is None:
            raise ValueError('layer-wise lr decay needs optimizer.lr')
        groups: List[dict] = []
        super().add_params(groups, module, prefix, is_dcn_module)
        names = {id(p): n for n, p in module.named_parameters()}
        backbone_name, backbone = find_layered_module(module)
        if backbone is None:
            raise TypeError(f'{type(self).__name__} needs a module with get_layer_depth '
                            f'(a NAT/DiNAT backbone) in {type(module).__name__}')
        prefix = f'{backbone_name}.' if backbone_name else ''
        for group in groups:
            depth, num_layers = backbone.get_layer_depth(names[id(group['params'][0])],
                                                         prefix)
            scale = self.decay_rate**(num_layers - 1 - depth)
            group['lr'] = group.get('lr', self.base_lr) * scale
            group['lr_scale'] = scale
            group['layer_id'] = depth
        params.extend(merge_groups(groups))
        scales = sorted({(g['layer_id'], g['lr_scale']) for g in groups})
        print_log(f'{type(self).__name__}: decay_rate={self.decay_rate}, {len(groups)} '
                  f'parameters in {len(params)} groups; the lr values logged above are '
                  f'multiplied per layer depth by '
                  f'{", ".join(f"{d}: {s:.4g}" for d, s in scales)}', logger='current')


def merge_groups(groups: List[dict]) -> List[dict]:
    """Merge parameter groups whose settings (everything but 'params') are equal."""
    merged: Dict[tuple, dict] = {}
    for group in groups:
        settings = tuple(sorted((k, repr(v)) for k, v in group.items() if k != 'params'))
        if settings in merged:
            merged[settings]['params'].extend(group['params'])
        else:
            merged[settings] = dict(group, params=list(group['params']))
    return list(merged.values())
