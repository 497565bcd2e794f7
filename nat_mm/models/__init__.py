"""NAT / DiNAT backbones; importing this registers them as 'NAT' and 'DiNAT' in the
MODELS registries of mmdet and mmseg (whichever are installed).

The backbones are mmengine BaseModules; the layers (``nat_mm.models.attention``,
``nat_mm.models.layers``) are plain PyTorch and build without mmengine.
"""
import importlib.util

__all__ = ['NAT', 'DiNAT', 'BACKBONES', 'REGISTERED_IN']

if importlib.util.find_spec('mmengine') is not None:
    from .dinat import DiNAT
    from .nat import NAT
    from .registry import register_in_mm

    BACKBONES = {'NAT': NAT, 'DiNAT': DiNAT}  # by the type names of configs
    REGISTERED_IN = register_in_mm('MODELS', BACKBONES)
else:
    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(f'nat_mm.models.{name} needs mmengine (the backbones are '
                              'mmengine BaseModules): pip install mmengine')
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
