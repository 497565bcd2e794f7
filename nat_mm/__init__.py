"""nat_mm: Neighborhood Attention Transformers (NAT / DiNAT) for OpenMMLab 2.0."""
from .version import __version__
from . import ops

__all__ = ['__version__', 'ops']
