"""The CPU kernels' scratch pool: reused memory must never alias a live tensor, pool
tensors behave like ordinary ones, the cache can be released and switched off."""
import os
import subprocess
import sys

import pytest
import torch

from nat_mm.ops import (backend_info, cpu_scratch_stats, na2d, na2d_qk, na2d_reference,
                        release_cpu_scratch)

pytestmark = pytest.mark.skipif(backend_info()['cpu'] != 'compiled',
                                reason='needs the compiled CPU kernels')


# attention maps of 4x2x160x160x49 float32 = 40 MiB: above the 32 MiB from which the pool
# keeps blocks (smaller ones go back to glibc)
BIG = (4, 2, 160, 160, 8)


def _inputs(seed, shape=BIG):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def test_live_outputs_are_never_reused():
    """Outputs of earlier calls stay intact while later calls take blocks from the pool."""
    first = [na2d_qk(*_inputs(s)[:2], 7) for s in range(3)]
    copies = [t.clone() for t in first]
    del first[1]  # return one block to the pool mid-way
    copies.pop(1)
    later = [na2d_qk(*_inputs(10 + s)[:2], 7) for s in range(3)]
    for kept, copy in zip(first, copies):
        assert torch.equal(kept, copy)
    for s, attn in enumerate(later):  # batch entries are independent: check the last one
        q, k, _ = _inputs(10 + s)
        torch.testing.assert_close(attn[-1:], na2d_qk(q[-1:], k[-1:], 7))
    assert cpu_scratch_stats()['in_use_bytes'] >= 5 * first[0].numel() * 4


def test_gradients_from_the_pool_accumulate_correctly():
    shape = (2, 2, 12, 14, 8)
    q, k, v = (t.requires_grad_() for t in _inputs(0, shape))
    for step in range(3):
        na2d(q, k, v, 5, 2).square().sum().backward()
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    na2d_reference(qr, kr, vr, (5, 5), (2, 2)).square().sum().backward()
    for a, b in zip((q, k, v), (qr, kr, vr)):
        torch.testing.assert_close(a.grad, 3 * b.grad, rtol=1e-4, atol=1e-5)


def test_pool_tensors_are_ordinary_tensors():
    q, k, _ = _inputs(1)
    attn = na2d_qk(q, k, 5)
    attn.resize_(2, *attn.shape)  # grows through the pool's allocator
    attn.fill_(1.0)
    assert attn.sum().item() == attn.numel()
    small = attn[:1, :1, :1]
    assert torch.load(_roundtrip(small), weights_only=True).equal(small)


def _roundtrip(t):
    import io
    buf = io.BytesIO()
    torch.save(t.clone(), buf)
    buf.seek(0)
    return buf


def test_release_empties_the_cache():
    attn = na2d_qk(*_inputs(2)[:2], 7)
    del attn
    assert cpu_scratch_stats()['cached_bytes'] > 0
    freed = release_cpu_scratch()
    assert freed > 0
    assert cpu_scratch_stats()['cached_bytes'] == 0


def _cached_after_one_map(**env):
    """Bytes the pool caches after one 40 MiB attention map died, in a fresh process."""
    code = ('import torch, nat_mm.ops as o; q = torch.randn(4, 2, 160, 160, 8); '
            'a = o.na2d_qk(q, q, 7); del a; print(o.cpu_scratch_stats()["cached_bytes"])')
    result = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, **env),
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_pool_can_be_switched_off():
    assert _cached_after_one_map() >= 4 * 2 * 160 * 160 * 49 * 4  # the map's block
    assert _cached_after_one_map(NAT_MM_CPU_SCRATCH_MB='0') == 0


def test_smallest_pooled_block_is_configurable():
    assert _cached_after_one_map(NAT_MM_CPU_SCRATCH_MIN_MB='64') == 0
