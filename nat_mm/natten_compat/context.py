"""NATTEN 0.17's ``natten.context``: its switches and capability queries.

NATTEN used these to choose among its kernels (fused or not, KV parallelism, tile
autotuning, TF32, ...). nat_mm chooses its own kernels, and every path computes the same
attention (deterministically), so the switches are recorded for code that reads them back
and change nothing else. Defaults are NATTEN 0.17's.
"""
import enum

import torch

from nat_mm.ops import backend_info

__all__ = ['use_fused_na', 'is_fused_na_enabled', 'use_fna', 'is_fna_enabled',
           'use_kv_parallelism_in_fused_na', 'is_kv_parallelism_in_fused_na_enabled',
           'MemoryUsagePreference', 'set_memory_usage_preference',
           'get_memory_usage_preference', 'is_memory_usage_default', 'is_memory_usage_strict',
           'is_memory_usage_unrestricted', 'use_autotuner', 'disable_autotuner',
           'is_autotuner_enabled', 'is_autotuner_enabled_for_forward',
           'is_autotuner_enabled_for_backward', 'use_deterministic_algorithms',
           'are_deterministic_algorithms_enabled', 'use_tiled_na', 'is_tiled_na_enabled',
           'use_gemm_na', 'is_gemm_na_enabled', 'use_tf32_in_gemm_na',
           'is_tf32_in_gemm_na_enabled', 'enable_tiled_na', 'disable_tiled_na',
           'enable_gemm_na', 'disable_gemm_na', 'enable_tf32', 'disable_tf32', 'has_cuda',
           'has_half', 'has_bfloat', 'has_gemm', 'has_fna', 'has_fused_na', 'has_tf32_gemm',
           'has_fp32_gemm', 'has_fp64_gemm']


class MemoryUsagePreference(enum.Enum):
    Default = 0
    Strict = 1
    Unrestricted = 2


# NATTEN 0.17's defaults: its Python switches off, libnatten's kernel switches (tiled,
# GEMM, TF32 in GEMM) on
_STATE = {'fused_na': False, 'kv_parallel': False, 'autotuner_forward': False,
          'autotuner_backward': False, 'deterministic': False,
          'memory_preference': MemoryUsagePreference.Default, 'tiled_na': True,
          'gemm_na': True, 'tf32_in_gemm_na': True}


def _flag(key: str):
    """A NATTEN on/off switch and its query, over _STATE[key]."""
    def use(mode: bool = True) -> None:
        _STATE[key] = bool(mode)

    def enabled() -> bool:
        return _STATE[key]

    return use, enabled


_use_fused, is_fused_na_enabled = _flag('fused_na')
use_kv_parallelism_in_fused_na, is_kv_parallelism_in_fused_na_enabled = _flag('kv_parallel')
# nat_mm's kernels are deterministic in any case (the rpb gradient included)
use_deterministic_algorithms, are_deterministic_algorithms_enabled = _flag('deterministic')
_use_autotuner_forward, is_autotuner_enabled_for_forward = _flag('autotuner_forward')
_use_autotuner_backward, is_autotuner_enabled_for_backward = _flag('autotuner_backward')
# NATTEN's tiled / GEMM / TF32 kernel switches: nat_mm has no such kernels to switch
use_tiled_na, is_tiled_na_enabled = _flag('tiled_na')
use_gemm_na, is_gemm_na_enabled = _flag('gemm_na')
use_tf32_in_gemm_na, is_tf32_in_gemm_na_enabled = _flag('tf32_in_gemm_na')


def use_fused_na(mode: bool = True, kv_parallel: bool = False, **options) -> None:
    """Records the switch (and kv_parallel); later NATTEN options are accepted too."""
    _use_fused(mode)
    use_kv_parallelism_in_fused_na(mode and kv_parallel)


def use_autotuner(forward_pass=None, backward_pass=None, **options) -> None:
    """Records the passes' switches (None leaves one as it is); tuning options are taken."""
    if forward_pass is not None:
        _use_autotuner_forward(forward_pass)
    if backward_pass is not None:
        _use_autotuner_backward(backward_pass)


def disable_autotuner() -> None:
    use_autotuner(False, False)


def is_autotuner_enabled() -> bool:
    return is_autotuner_enabled_for_forward() or is_autotuner_enabled_for_backward()


def set_memory_usage_preference(pref: str = 'default') -> None:
    names = [p.name.lower() for p in MemoryUsagePreference]
    if pref not in names:
        raise ValueError(f'pref must be one of {tuple(names)}, got {pref!r}')
    _STATE['memory_preference'] = MemoryUsagePreference[pref.capitalize()]


def get_memory_usage_preference() -> MemoryUsagePreference:
    return _STATE['memory_preference']


def _preference_is(pref: MemoryUsagePreference):
    def query() -> bool:
        return get_memory_usage_preference() is pref

    return query


is_memory_usage_default = _preference_is(MemoryUsagePreference.Default)
is_memory_usage_strict = _preference_is(MemoryUsagePreference.Strict)
is_memory_usage_unrestricted = _preference_is(MemoryUsagePreference.Unrestricted)


def _switch_then_query(use, enabled, mode: bool):
    """NATTEN's older enable_*/disable_* forms: set, then return the query's answer."""
    def switch() -> bool:
        use(mode)
        return enabled()

    return switch


enable_tiled_na = _switch_then_query(use_tiled_na, is_tiled_na_enabled, True)
disable_tiled_na = _switch_then_query(use_tiled_na, is_tiled_na_enabled, False)
enable_gemm_na = _switch_then_query(use_gemm_na, is_gemm_na_enabled, True)
disable_gemm_na = _switch_then_query(use_gemm_na, is_gemm_na_enabled, False)
enable_tf32 = _switch_then_query(use_tf32_in_gemm_na, is_tf32_in_gemm_na_enabled, True)
disable_tf32 = _switch_then_query(use_tf32_in_gemm_na, is_tf32_in_gemm_na_enabled, False)
use_fna, is_fna_enabled = use_fused_na, is_fused_na_enabled


def has_cuda() -> bool:
    return torch.cuda.is_available() and backend_info().get('cuda') == 'compiled'


def has_half(device_index=None) -> bool:
    return has_cuda()


has_bfloat = has_gemm = has_fna = has_fused_na = has_half
has_tf32_gemm = has_fp32_gemm = has_fp64_gemm = has_half
