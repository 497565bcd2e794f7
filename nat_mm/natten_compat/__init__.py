"""Run code written for NATTEN 0.14.5 to 0.17 (NAT, DiNAT, StyleNAT, ...) on nat_mm's ops.

    import nat_mm.natten_compat
    nat_mm.natten_compat.install()       # `import natten` now gives this module
    from natten import NeighborhoodAttention2D
    from natten.functional import natten2dqkrpb, natten2dav, na2d

Current NATTEN dropped the relative position bias, the unfused ops and the CPU kernels
that these models were trained with; this layer gives them back with NATTEN's names,
signatures, layouts and parameter names (``qkv``, ``rpb``, ``proj``), so their
checkpoints load unchanged. 2D only; see ``functional`` for what raises.
"""
import sys
from types import ModuleType
from typing import Optional

from nat_mm.models.attention import NeighborhoodAttention
from nat_mm.ops.validation import IntOrPair
from . import context, functional
from .context import *  # noqa: F401,F403  (NATTEN exports its switches at the top level)
from .functional import refuse_unsupported

__all__ = ['NeighborhoodAttention2D', 'context', 'functional', 'install'] + context.__all__


class NeighborhoodAttention2D(NeighborhoodAttention):
    """NATTEN's ``NeighborhoodAttention2D`` module: x [B, H, W, dim] -> [B, H, W, dim].

    Keyword arguments of both generations are accepted: ``bias`` (NATTEN <= 0.16) or
    ``rel_pos_bias`` (0.17) switch the relative position bias; without either the bias
    is on, as in NATTEN <= 0.16 and every NAT/DiNAT checkpoint (NATTEN 0.17 defaulted
    to off: pass ``rel_pos_bias=False`` for such code). Arguments after ``dilation``
    are keyword-only, because the two generations order them differently.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: IntOrPair,
                 dilation: IntOrPair = 1, *, bias: Optional[bool] = None,
                 rel_pos_bias: Optional[bool] = None, is_causal=False,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0., proj_drop: float = 0.):
        refuse_unsupported(is_causal)
        if bias is not None and rel_pos_bias is not None and bias != rel_pos_bias:
            raise ValueError(f'bias={bias} and rel_pos_bias={rel_pos_bias} disagree: they '
                             'are the NATTEN <= 0.16 and 0.17 names of one switch, pass one')
        with_bias = next((b for b in (rel_pos_bias, bias) if b is not None), True)
        # NATTEN's `dilation or 1` and `qk_scale or head_dim ** -0.5`
        super().__init__(dim, num_heads, kernel_size, dilation or 1, qkv_bias, attn_drop,
                         proj_drop, rel_pos_bias=with_bias, qk_scale=qk_scale or None)
        self.head_dim = self.head_dims  # NATTEN's attribute name


def install() -> ModuleType:
    """Make ``import natten`` (and ``natten.functional``, ``natten.context``) resolve to
    this layer."""
    this = sys.modules[__name__]
    present = sys.modules.get('natten')
    if present is not None and present is not this:
        raise RuntimeError(
            f'another natten is already imported ({getattr(present, "__file__", present)}): '
            'call nat_mm.natten_compat.install() before anything imports natten')
    sys.modules['natten'] = this
    sys.modules['natten.functional'] = functional
    sys.modules['natten.context'] = context
    return this
