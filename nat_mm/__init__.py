"""nat_mm: Neighborhood Attention Transformers (NAT / DiNAT) for OpenMMLab 2.0.

``import nat_mm`` registers the NAT/DiNAT backbones (mmdet and mmseg), the layer-decay
optimizer constructor and the FLOP counters of the NA ops. Without mmengine installed
only ``nat_mm.ops`` is available.
"""
import importlib.util

from .version import __version__
from . import ops

__all__ = ['__version__', 'ops']

if importlib.util.find_spec('mmengine') is not None:
    from . import models, optim, flops  # noqa: F401  (registration side effects)
    __all__ += ['models', 'optim', 'flops']
