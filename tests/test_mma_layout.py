"""The tensor-core CUDA kernels' shared-memory layout, checked on the CPU.

``nat_mm._C.mma_neighbor_keys`` walks the tiles with the layout functions the kernels use
(``csrc/na2d_mma_layout.h``: halo pitch, per-warp key range, window slots) and reports the
key each neighbor of each query reads from the staged halo; it also checks that no read
leaves a warp's GEMM range or hits a zero slot. Here that key must be the neighbor the
definition gives (``axis_neighbors``, the reference's index math), for borders, dilation,
rectangular kernels, maps smaller than a tile and kernel == map.

``nat_mm._C.mma_key_side_pairs`` walks the backward's key tiles the same way (each key
gathers the queries that see it from a warp range of the staged query halo) and reports,
for every (query, neighbor) pair, the key whose gather covered it: every pair exactly
once, and the key must again be the one the definition gives.
"""
import pytest
import torch

from nat_mm.ops import backend_info
from nat_mm.ops.reference import axis_neighbors

pytestmark = pytest.mark.skipif(backend_info()['cpu'] != 'compiled',
                                reason='needs the compiled extension')

CASES = [  # (H, W, kernel, dilation)
    (7, 7, (3, 3), (1, 1)),
    (7, 7, (7, 7), (1, 1)),        # NAT stage 4: kernel == map
    (14, 14, (7, 7), (1, 1)),      # NAT stage 3
    (56, 56, (7, 7), (1, 1)),      # NAT stage 1
    (25, 42, (7, 7), (1, 1)),      # detection stage 4
    (14, 12, (7, 7), (2, 1)),      # H == k * d
    (56, 48, (7, 7), (4, 6)),      # DiNAT-like dilation
    (20, 24, (9, 13), (2, 1)),     # rectangular kernel
    (13, 13, (13, 13), (1, 1)),
    (17, 19, (3, 3), (4, 4)),
    (9, 23, (5, 3), (1, 3)),
    (30, 9, (9, 3), (3, 1)),
    (35, 37, (31, 31), (1, 1)),    # k = 31 (too big for shared memory on a GPU; the math holds)
]


def _expected(height, width, kernel, dilation):
    rows, _ = axis_neighbors(height, kernel[0], dilation[0])
    cols, _ = axis_neighbors(width, kernel[1], dilation[1])
    keys = rows[:, None, :, None] * width + cols[None, :, None, :]  # [H, W, kh, kw]
    return keys.reshape(height, width, -1)


@pytest.mark.parametrize('case', CASES, ids=lambda c: '{}x{}_k{}x{}_d{}x{}'.format(
    c[0], c[1], *c[2], *c[3]))
def test_every_neighbor_reads_its_key(case):
    from nat_mm import _C
    height, width, kernel, dilation = case
    got = _C.mma_neighbor_keys(height, width, *kernel, *dilation)
    assert (got >= 0).all(), 'a query was not covered by any tile'
    assert torch.equal(got, _expected(height, width, kernel, dilation))


@pytest.mark.parametrize('case', CASES + [
    (16, 16, (7, 7), (1, 1)),      # k + k/2 + 1 query rows per warp at both borders
    (200, 336, (7, 7), (1, 1)),    # detection stage 1
    (31, 29, (11, 5), (2, 3)),
], ids=lambda c: '{}x{}_k{}x{}_d{}x{}'.format(c[0], c[1], *c[2], *c[3]))
def test_key_side_covers_every_pair_once(case):
    from nat_mm import _C
    height, width, kernel, dilation = case
    got = _C.mma_key_side_pairs(height, width, *kernel, *dilation)
    assert (got >= 0).all(), 'a (query, neighbor) pair was not gathered by any key'
    assert torch.equal(got, _expected(height, width, kernel, dilation))


@pytest.mark.parametrize('walk', ['mma_neighbor_keys', 'mma_key_side_pairs'])
def test_bad_geometry_raises(walk):
    from nat_mm import _C
    with pytest.raises(RuntimeError, match='kernel'):
        getattr(_C, walk)(5, 5, 7, 7, 1, 1)
