// Shared-memory layout of the tensor-core tiles (csrc/cuda/na2d_cuda_fused_mma.cu), host +
// device inline so that the CPU tests check the same code (csrc/mma_layout_check.cpp,
// nat_mm._C.mma_neighbor_keys, tests/test_mma_layout.py).
//
// A tile is kMmaTile x kMmaTile queries of one dilation residue class (sub-grid rows
// [s0h, s1h], columns [s0w, s1w]); its key halo starts at sub-grid (k0h, k0w) and is staged
// row by row, `pitch` slots per halo row (slots past the halo hold zeros). Warp w owns the
// tile rows 2w and 2w + 1 (16 queries): their windows lie in kh + 1 consecutive halo rows
// from row_lo on, so each warp GEMM reads the nk slots from row_lo * pitch on.
//
// The backward's key side mirrors it: a tile is kMmaTile x kMmaTile keys, its halo holds the
// queries that see them (axis_inverse), and warp w owns the key rows 2w and 2w + 1, whose
// queries lie in `rows` consecutive halo rows (mma_key_range_rows) from mma_key_row_lo on.
#pragma once

#include "na2d_index.h"

namespace nat_mm {

constexpr int kMmaTile = 8;   // 8 x 8 queries per block
constexpr int kMmaWarps = 4;  // 16 queries each

struct MmaLayout {
  int64_t pitch;  // slots per halo row (even: keeps every warp range 32-byte aligned)
  int64_t nk;     // slots per warp GEMM (a multiple of 16)
  int64_t slots;  // slots staged per tile: the last warp range ends inside them
};

// For the largest halo of the map (halo_h x halo_w sub-grid positions).
NAT_HOST_DEVICE MmaLayout mma_layout(int64_t halo_h, int64_t halo_w, int64_t kh) {
  MmaLayout l;
  l.pitch = (halo_w + 1) / 2 * 2;
  l.nk = ((kh + 1) * l.pitch + 15) / 16 * 16;
  // a warp's range starts at most halo_h - kh rows in
  l.slots = (halo_h > kh ? halo_h - kh : 0) * l.pitch + l.nk;
  return l;
}

// The halo row (from k0h) where warp `warp`'s key range starts.
NAT_HOST_DEVICE int64_t mma_row_lo(int warp, int64_t s0h, int64_t s1h, int64_t len_h,
                                   int64_t kh, int64_t k0h) {
  const int64_t row = s0h + 2 * warp < s1h ? s0h + 2 * warp : s1h;  // clamped past the edge
  return sub_window_start(row, len_h, kh) - k0h;
}

// Slot, within its warp's key range, of neighbor (0, 0) of a query whose window starts at
// sub-grid (start_h, start_w); neighbor (m, n) is that slot + m * pitch + n.
NAT_HOST_DEVICE int64_t mma_first_slot(int64_t start_h, int64_t start_w, int64_t k0h,
                                       int64_t k0w, int64_t row_lo, int64_t pitch) {
  return (start_h - k0h - row_lo) * pitch + start_w - k0w;
}

// ---------------------------------------------------------------- key tiles
// The most query rows that see two adjacent key rows (a, a + 1; a even, as the warps own
// them, a + 1 clamped to the last row) on a sub-grid of length len: k + 1 inside, up to
// k + k/2 + 1 next to a border (border queries share a clamped window), up to len on maps
// under 2k. Host only (a loop over the rows).
inline int64_t mma_key_range_rows(int64_t len, int64_t kernel) {
  int64_t rows = 0;
  for (int64_t a = 0; a < len; a += 2) {
    const int64_t b = a + 1 < len ? a + 1 : len - 1;
    const int64_t span = sub_inverse_last(b, len, kernel) - sub_inverse_first(a, kernel) + 1;
    rows = span > rows ? span : rows;
  }
  return rows;
}

// The largest halo (rows x columns) of the tiles of an H x W map over all residue classes,
// and the halo rows per warp range: keys seen by query tiles (tile + k - 1 per axis, kh + 1
// rows), or queries that see key tiles (tile + 2(k - 1), mma_key_range_rows). Host only.
struct MmaHalo {
  int64_t halo_h, halo_w, rows;
};
inline MmaHalo mma_halo(int64_t height, int64_t width, int64_t kh, int64_t kw, int64_t dh,
                        int64_t dw, bool key_tiles) {
  const int64_t reach = key_tiles ? 2 : 1;
  const int64_t sub_h = subgrid_length(height, dh, 0), sub_w = subgrid_length(width, dw, 0);
  MmaHalo h;
  h.halo_h = kMmaTile + reach * (kh - 1) < sub_h ? kMmaTile + reach * (kh - 1) : sub_h;
  h.halo_w = kMmaTile + reach * (kw - 1) < sub_w ? kMmaTile + reach * (kw - 1) : sub_w;
  h.rows = key_tiles ? 0 : kh + 1;
  for (int64_t r = 0; key_tiles && r < dh; ++r) {
    const int64_t rows = mma_key_range_rows(subgrid_length(height, dh, r), kh);
    h.rows = rows > h.rows ? rows : h.rows;
  }
  return h;
}

// Layout of key tiles whose largest query halo is halo_h x halo_w, with `rows` query rows
// per warp range; the ranges are clamped into the staged rows (mma_key_row_lo).
NAT_HOST_DEVICE MmaLayout mma_key_layout(int64_t halo_h, int64_t halo_w, int64_t rows) {
  MmaLayout l;
  l.pitch = (halo_w + 1) / 2 * 2;
  l.nk = (rows * l.pitch + 15) / 16 * 16;
  l.slots = (halo_h > rows ? halo_h - rows : 0) * l.pitch + l.nk;
  return l;
}

// The halo row (from the tile's first query row q0h, with nh rows staged) where warp
// `warp`'s query range starts: at the first query that sees its key row 2w, moved back so
// that the range ends inside the staged rows (it still holds every query the warp needs,
// which all lie in [first, nh)).
NAT_HOST_DEVICE int64_t mma_key_row_lo(int warp, int64_t s0h, int64_t s1h, int64_t len_h,
                                       int64_t kh, int64_t q0h, int64_t nh, int64_t rows) {
  const int64_t row = s0h + 2 * warp < s1h ? s0h + 2 * warp : s1h;
  const int64_t first = sub_inverse_first(row, kh) - q0h;
  const int64_t last_start = nh > rows ? nh - rows : 0;
  return first < last_start ? first : last_start;
}

}  // namespace nat_mm
