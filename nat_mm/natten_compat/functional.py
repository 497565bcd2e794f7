"""NATTEN's 2D functional API (0.14.5 to 0.17 names and signatures) on nat_mm's operators.

Unfused ops use NATTEN's heads-first layout [B, heads, H, W, D]; the fused ``na2d`` of
NATTEN 0.17 takes heads-last [B, H, W, heads, D], as NATTEN's does. Unlike NATTEN's
fused kernels, every op here also trains the relative position bias and runs on CPU.
What nat_mm does not implement (causal masks, additional keys/values, 1D and 3D) raises
an error that names it instead of computing something else.
"""
from typing import Optional

from torch import Tensor

from nat_mm import ops
from nat_mm.ops.validation import IntOrPair, check_tensor

_NOT_2D = ('na1d', 'na1d_qk', 'na1d_av', 'na3d', 'na3d_qk', 'na3d_av', 'natten1dqkrpb',
           'natten1dqk', 'natten1dav', 'natten3dqkrpb', 'natten3dqk', 'natten3dav')


def refuse_unsupported(is_causal=False, **extra_tokens) -> None:
    """Raise NotImplementedError for the NATTEN features nat_mm does not have."""
    causal = is_causal if isinstance(is_causal, (tuple, list)) else (is_causal, )
    if any(causal):
        raise NotImplementedError(
            f'is_causal={is_causal!r}: nat_mm implements non-causal neighborhood '
            'attention only (as NAT and DiNAT use it); pass is_causal=False')
    for name, value in extra_tokens.items():
        if value is not None:
            raise NotImplementedError(f'{name}: nat_mm has no additional keys/values '
                                      f'(NATTEN 0.17 cross attention); pass {name}=None')


def bias_like(rpb: Optional[Tensor], query) -> Optional[Tensor]:
    """rpb in query's dtype, as NATTEN casts it (a float32 bias meets half-precision q/k
    outside autocast too)."""
    if isinstance(rpb, Tensor) and isinstance(query, Tensor) and rpb.dtype != query.dtype:
        return rpb.to(query.dtype)
    return rpb


def na2d_qk(query: Tensor, key: Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
            additional_keys: Optional[Tensor] = None, is_causal=False,
            rpb: Optional[Tensor] = None) -> Tensor:
    """NATTEN 0.17 ``na2d_qk``: unscaled logits (+ rpb), [B, heads, H, W, kh*kw]."""
    refuse_unsupported(is_causal, additional_keys=additional_keys)
    return ops.na2d_qk(query, key, kernel_size, dilation, rpb=bias_like(rpb, query))


def na2d_av(attn: Tensor, value: Tensor, kernel_size: IntOrPair, dilation: IntOrPair = 1,
            additional_values: Optional[Tensor] = None, is_causal=False) -> Tensor:
    """NATTEN 0.17 ``na2d_av``: attn [B, heads, H, W, kh*kw] times neighbor values."""
    refuse_unsupported(is_causal, additional_values=additional_values)
    return ops.na2d_av(attn, value, kernel_size, dilation)


def na2d(query: Tensor, key: Tensor, value: Tensor, kernel_size: IntOrPair,
         dilation: IntOrPair = 1, is_causal=False, rpb: Optional[Tensor] = None,
         scale: Optional[float] = None) -> Tensor:
    """NATTEN 0.17 fused ``na2d``, heads-last: q, k, v and the result are
    [B, H, W, heads, D]; ``scale`` defaults to D ** -0.5."""
    refuse_unsupported(is_causal)
    for name, tensor in (('query', query), ('key', key), ('value', value)):
        check_tensor(tensor, name, 5, '[B, H, W, heads, D] (NATTEN fused layout)')
    # permuted views: the kernels read the heads-last layout in place where they can
    heads_first = [t.permute(0, 3, 1, 2, 4) for t in (query, key, value)]
    out = ops.na2d(*heads_first, kernel_size, dilation, rpb=bias_like(rpb, query),
                   scale=scale or None)
    return out.permute(0, 2, 3, 1, 4)


def natten2dqkrpb(query: Tensor, key: Tensor, rpb: Optional[Tensor], kernel_size: int,
                  dilation: int) -> Tensor:
    """NATTEN 0.14.5-0.17.4 name of ``na2d_qk`` with a bias."""
    return na2d_qk(query, key, kernel_size, dilation, rpb=rpb)


na2d_qk_with_bias = natten2dqkrpb  # (the same signature under NATTEN 0.15-0.16's name)


def natten2dqk(query: Tensor, key: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """NATTEN 0.14.5-0.17.4 name of ``na2d_qk`` without a bias."""
    return na2d_qk(query, key, kernel_size, dilation)


def natten2dav(attn: Tensor, value: Tensor, kernel_size: int, dilation: int) -> Tensor:
    """NATTEN 0.14.5-0.17.4 name of ``na2d_av``."""
    return ops.na2d_av(attn, value, kernel_size, dilation)


def __getattr__(name: str):
    if name in _NOT_2D:
        raise AttributeError(f'natten.functional.{name}: nat_mm implements 2D neighborhood '
                             'attention only (na2d, na2d_qk, na2d_av, natten2dqkrpb, '
                             'natten2dqk, natten2dav)')
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
