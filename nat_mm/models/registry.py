"""Registration of nat_mm classes in the registries of mmdet and mmseg.

Each package is optional: one that is not installed is skipped, so nat_mm works with
only mmdet, only mmseg, or neither (plain PyTorch use).
"""
import importlib
from typing import Dict, List

MM_PACKAGES = ('mmdet', 'mmseg')


def register_in_mm(registry_name: str, modules: Dict[str, type]) -> List[str]:
    """Register ``modules`` ({name: class}) in ``<package>.registry.<registry_name>``
    of every installed mm package; returns the packages that got them."""
    registered = []
    for package in MM_PACKAGES:
        try:
            registry = getattr(importlib.import_module(f'{package}.registry'),
                               registry_name)
        except ImportError:
            continue
        for name, cls in modules.items():
            if registry.module_dict.get(name) is not cls:  # idempotent on re-import
                registry.register_module(name=name, module=cls)
        registered.append(package)
    return registered
