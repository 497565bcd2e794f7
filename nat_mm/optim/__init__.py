"""Optimizer-wrapper constructors; importing this registers
'NATLayerDecayOptimizerConstructor' in the OPTIM_WRAPPER_CONSTRUCTORS of mmdet and
mmseg (whichever are installed)."""
from ..models.registry import register_in_mm
from .layer_decay import NATLayerDecayOptimizerConstructor

REGISTERED_IN = register_in_mm(
    'OPTIM_WRAPPER_CONSTRUCTORS',
    {'NATLayerDecayOptimizerConstructor': NATLayerDecayOptimizerConstructor})

__all__ = ['NATLayerDecayOptimizerConstructor', 'REGISTERED_IN']
