// Shared-memory layout of the tensor-core tiles (csrc/cuda/na2d_cuda_fused_mma.cu), host +
// device inline so that the CPU tests check the same code (csrc/mma_layout_check.cpp,
// nat_mm._C.mma_neighbor_keys, tests/test_mma_layout.py).
//
// A tile is kMmaTile x kMmaTile queries of one dilation residue class (sub-grid rows
// [s0h, s1h], columns [s0w, s1w]); its key halo starts at sub-grid (k0h, k0w) and is staged
// row by row, `pitch` slots per halo row (slots past the halo hold zeros). Warp w owns the
// tile rows 2w and 2w + 1 (16 queries): their windows lie in kh + 1 consecutive halo rows
// from row_lo on, so each warp GEMM reads the nk slots from row_lo * pitch on.
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

}  // namespace nat_mm
