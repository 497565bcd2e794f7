"""NATTEN 0.17's ``natten.context``: its switches and capability queries.

NATTEN used these to choose among its kernels (fused or not, KV parallelism, tile
autotuning, TF32, ...). nat_mm chooses its own kernels, and every path computes the same
attention (deterministically), so the switches are recorded for code that reads them back
and change nothing else. Defaults are NATTEN 0.17's (everything off).
"""
import torch

from nat_mm.ops import backend_info

__all__ = ['use_fused_na', 'is_fused_na_enabled', 'use_fna', 'is_fna_enabled',
           'use_kv_parallelism_in_fused_na', 'is_kv_parallelism_in_fused_na_enabled',
           'set_memory_usage_preference', 'get_memory_usage_preference', 'use_autotuner',
           'disable_autotuner', 'is_autotuner_enabled', 'use_deterministic_algorithms',
           'are_deterministic_algorithms_enabled', 'use_tiled_na', 'use_gemm_na',
           'use_tf32_in_gemm_na', 'has_cuda', 'has_half', 'has_bfloat', 'has_gemm', 'has_fna',
           'has_fused_na']

_STATE = {'fused_na': False, 'kv_parallel': False, 'autotuner': False,
          'deterministic': False, 'memory_preference': 'default'}
MEMORY_PREFERENCES = ('default', 'strict', 'unrestricted')


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
_use_autotuner, is_autotuner_enabled = _flag('autotuner')


def use_fused_na(mode: bool = True, kv_parallel: bool = False, **options) -> None:
    """Records the switch (and kv_parallel); later NATTEN options are accepted too."""
    _use_fused(mode)
    use_kv_parallelism_in_fused_na(mode and kv_parallel)


def use_autotuner(forward_pass=None, backward_pass=None, **options) -> None:
    if forward_pass is not None or backward_pass is not None:
        _use_autotuner(forward_pass or backward_pass)


def disable_autotuner() -> None:
    _use_autotuner(False)


def set_memory_usage_preference(pref: str = 'default') -> None:
    if pref not in MEMORY_PREFERENCES:
        raise ValueError(f'pref must be one of {MEMORY_PREFERENCES}, got {pref!r}')
    _STATE['memory_preference'] = pref


def get_memory_usage_preference() -> str:
    return _STATE['memory_preference']


def _kernel_switch(mode: bool = True) -> None:
    """NATTEN's tiled / GEMM / TF32 kernel switches: nat_mm has no counterpart."""


use_tiled_na = use_gemm_na = use_tf32_in_gemm_na = _kernel_switch
use_fna, is_fna_enabled = use_fused_na, is_fused_na_enabled


def has_cuda() -> bool:
    return torch.cuda.is_available() and backend_info().get('cuda') == 'compiled'


def has_half(device_index=None) -> bool:
    return has_cuda()


has_bfloat = has_gemm = has_fna = has_fused_na = has_half
