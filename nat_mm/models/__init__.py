"""NAT / DiNAT backbones; importing this registers them as 'NAT' and 'DiNAT' in the
MODELS registries of mmdet and mmseg (whichever are installed)."""
from .dinat import DiNAT
from .nat import NAT
from .registry import register_in_mm

REGISTERED_IN = register_in_mm('MODELS', {'NAT': NAT, 'DiNAT': DiNAT})

__all__ = ['NAT', 'DiNAT', 'REGISTERED_IN']
