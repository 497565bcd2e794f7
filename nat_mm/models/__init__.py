"""NAT / DiNAT backbones; importing this registers them as 'NAT' and 'DiNAT' in the
MODELS registries of mmdet and mmseg (whichever are installed)."""
from .dinat import DiNAT
from .nat import NAT
from .registry import register_in_mm

BACKBONES = {'NAT': NAT, 'DiNAT': DiNAT}  # by the type names of configs
REGISTERED_IN = register_in_mm('MODELS', BACKBONES)

__all__ = ['NAT', 'DiNAT', 'BACKBONES', 'REGISTERED_IN']
