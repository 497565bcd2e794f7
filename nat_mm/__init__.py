"""nat_mm: Neighborhood Attention Transformers (NAT / DiNAT) for OpenMMLab 2.0.

``import nat_mm`` registers the NAT/DiNAT backbones (mmdet and mmseg), the layer-decay
optimizer constructor and the FLOP counters of the NA ops. Without mmengine installed
only ``nat_mm.ops`` is available.
"""
import importlib.util

from .version import __version__
from . import ops
from . import safe_load

# torch >= 2.6 loads with weights_only=True: allow exactly what mm checkpoints hold
safe_load.allow_mm_checkpoint_types()

__all__ = ['__version__', 'ops', 'safe_load']

if importlib.util.find_spec('mmengine') is not None:
    from . import models, optim, flops  # noqa: F401  (registration side effects)
    safe_load.harden_mmengine_checkpoint_loader()  # explicit weights_only=True
    __all__ += ['models', 'optim', 'flops']
