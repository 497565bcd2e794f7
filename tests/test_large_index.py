"""64-bit indexing (issue 7): operators on tensors with more than 2**31 elements.

na2d_qk writes an attention map of 1 x 1 x 6624 x 6624 x 49 = 2,149,991,424 > 2**31
float32 elements (8.0 GiB); na2d_av then reads it. head_dim is 1 to keep the inputs small
(float32, because the CPU kernels compute float16 in float32 copies: float16 would need
three times the memory). With 32-bit offsets the entries past
element 2**31 (the bottom rows of the map) would be written to / read from the wrong
place. Sampled entries -- the corners, the very last element, rows right around the
2**31 boundary and random ones -- are checked against a direct float64 computation.

Slow and memory-hungry (peak ~9 GiB, a minute or two with the compiled kernels): marked
``slow``, run with ``pytest -m slow tests/test_large_index.py`` or NAT_MM_RUN_SLOW=1.
Needs the compiled CPU kernels (the pure-PyTorch reference would need ~4x the memory).
"""
import time

import pytest
import torch

from nat_mm.ops import backend_info, na2d_av, na2d_qk
from nat_mm.ops.reference import axis_neighbors

SIZE, KERNEL, DILATION, DIM = 6624, 7, 2, 1
WINDOW = KERNEL * KERNEL
NEEDED_GIB = 10


def available_gib():
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return float('inf')


def sample_queries(generator):
    """Corners, the rows holding flat index 2**31 of the attention map, random ones."""
    boundary_query = 2 ** 31 // WINDOW
    row = boundary_query // SIZE
    picks = [(0, 0), (0, SIZE - 1), (SIZE - 1, 0), (SIZE - 1, SIZE - 1),
             (row, boundary_query % SIZE), (row, SIZE - 1), (row + 1, 0),
             (SIZE // 2, SIZE // 2)]
    rows = torch.randint(row, SIZE, (12,), generator=generator).tolist()
    cols = torch.randint(0, SIZE, (12,), generator=generator).tolist()
    picks += list(zip(rows, cols))
    rows = torch.randint(0, SIZE, (4,), generator=generator).tolist()
    cols = torch.randint(0, SIZE, (4,), generator=generator).tolist()
    return picks + list(zip(rows, cols))


@pytest.mark.slow
def test_qk_and_av_beyond_2_31_elements():
    if backend_info()['cpu'] != 'compiled':
        pytest.skip('needs the compiled CPU kernels: python setup.py build_ext --inplace')
    if available_gib() < NEEDED_GIB:
        pytest.skip(f'needs {NEEDED_GIB} GiB of free memory, {available_gib():.1f} available')
    generator = torch.Generator().manual_seed(0)
    shape = (1, 1, SIZE, SIZE, DIM)
    query = torch.empty(shape, dtype=torch.float32).uniform_(-0.5, 0.5, generator=generator)
    key = torch.empty(shape, dtype=torch.float32).uniform_(-0.5, 0.5, generator=generator)
    value = torch.empty(shape, dtype=torch.float32).uniform_(-1, 1, generator=generator)

    start = time.perf_counter()
    attn = na2d_qk(query, key, KERNEL, DILATION)
    qk_seconds = time.perf_counter() - start
    assert attn.shape == (1, 1, SIZE, SIZE, WINDOW)
    assert attn.numel() > 2 ** 31

    start = time.perf_counter()
    out = na2d_av(attn, value, KERNEL, DILATION)
    av_seconds = time.perf_counter() - start

    rows, _ = axis_neighbors(SIZE, KERNEL, DILATION)
    cols = rows  # square map
    q64, k64, v64 = (t[0, 0] for t in (query, key, value))
    for i, j in sample_queries(generator):
        keys = k64[rows[i][:, None], cols[j][None, :]].double().reshape(WINDOW, DIM)
        vals = v64[rows[i][:, None], cols[j][None, :]].double().reshape(WINDOW, DIM)
        expected_attn = keys @ q64[i, j].double()
        torch.testing.assert_close(attn[0, 0, i, j].double(), expected_attn,
                                   atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f'attn at query ({i}, {j}): {m}')
        expected_out = attn[0, 0, i, j].double() @ vals
        torch.testing.assert_close(out[0, 0, i, j].double(), expected_out,
                                   atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f'out at query ({i}, {j}): {m}')
    # the very last element of the attention map, and nothing left unwritten
    i = j = SIZE - 1
    last = k64[rows[i][-1], cols[j][-1]].double() @ q64[i, j].double()
    assert abs(float(attn.view(-1)[-1]) - float(last)) < 1e-6
    assert torch.isfinite(attn[0, 0, -64:]).all() and torch.isfinite(out[0, 0, -64:]).all()
    print(f'na2d_qk {qk_seconds:.1f}s, na2d_av {av_seconds:.1f}s for '
          f'{attn.numel():,} attention entries')


def test_sizes_really_exceed_int32():
    """The shapes above do need 64-bit offsets (kept fast: no tensors)."""
    numel = SIZE * SIZE * WINDOW
    assert numel > 2 ** 31
    assert SIZE >= KERNEL * DILATION
    assert (SIZE - 1) * SIZE * WINDOW + (SIZE - 1) * WINDOW + WINDOW - 1 >= 2 ** 31
