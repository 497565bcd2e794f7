"""Neighborhood-attention operators: public functions, reference and backend report.

    from nat_mm.ops import na2d, na2d_qk, na2d_av, backend_info
"""
from . import library  # defines the op schemas, fake kernels and autograd formulas
from . import autograd  # Autograd kernels: the ops' autograd.Functions
from . import autocast  # Autocast kernels: the ops run in the autocast dtype
from . import extension
from . import vmap  # batching rules: torch.func.vmap runs each op once
from .functional import na2d, na2d_av, na2d_qk
from .reference import na2d_av_reference, na2d_qk_reference, na2d_reference

extension.load()
backend_info = extension.backend_info
cpu_scratch_stats = extension.cpu_scratch_stats
release_cpu_scratch = extension.release_cpu_scratch

__all__ = ['na2d', 'na2d_qk', 'na2d_av', 'backend_info', 'cpu_scratch_stats',
           'release_cpu_scratch', 'na2d_reference', 'na2d_qk_reference', 'na2d_av_reference']
