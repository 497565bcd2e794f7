"""Norm / activation layers from mm-style configs, without requiring mmcv.

NAT normalizes channels-last tokens, so only LayerNorm-type norms fit; activations are
looked up in the mm registry (mmcv registers its own there) and then in ``torch.nn``.
"""
from torch import nn

LAYER_NORM_TYPES = ('LN', 'LayerNorm')


def build_norm(norm_cfg: dict, num_features: int) -> nn.Module:
    cfg = dict(norm_cfg)
    norm_type = cfg.pop('type')
    requires_grad = cfg.pop('requires_grad', True)
    if norm_type not in LAYER_NORM_TYPES:
        raise ValueError(f'NAT normalizes channels-last tokens, so norm_cfg type must be one '
                         f'of {LAYER_NORM_TYPES}, got {norm_type!r}')
    layer = nn.LayerNorm(num_features, **cfg)
    for param in layer.parameters():
        param.requires_grad = requires_grad
    return layer


def _mm_registered(type_name: str):
    """The class registered under type_name in mmengine's MODELS, or None (also without
    mmengine: the layers are plain PyTorch)."""
    try:
        from mmengine.registry import MODELS
    except ImportError:
        return None
    return MODELS.get(type_name)


def build_activation(act_cfg: dict) -> nn.Module:
    cfg = dict(act_cfg)
    act_type = cfg.pop('type')
    if isinstance(act_type, type):  # configs may name the class itself
        return act_type(**cfg)
    registered = _mm_registered(act_type)
    if registered is not None:
        return registered(**cfg)
    if not isinstance(getattr(nn, act_type, None), type):
        raise ValueError(f'unknown activation type {act_type!r}')
    return getattr(nn, act_type)(**cfg)
