// Walks the tensor-core kernels' tiles on the host with their layout functions
// (na2d_mma_layout.h) and reports which key every neighbor of every query reads from the
// staged halo, so that CPU tests can compare it with the definition of the window.
#include "mma_layout_check.h"

#include <ATen/ops/full.h>

#include <algorithm>

#include "na2d_checks.h"  // NAT_MM_CHECK, message_int
#include "na2d_mma_layout.h"

namespace nat_mm {
namespace {

// One axis of one residue class: its sub-grid length, kernel and largest planned halo.
struct Axis {
  int64_t len, kernel, halo, dilation, residue;
};

// One axis of one tile: sub-grid positions [s0, s1] and its key halo [k0, k0 + n).
struct AxisTile {
  int64_t s0, s1, k0, n;
};

AxisTile axis_tile(int64_t s0, const Axis& a) {
  AxisTile t{s0, std::min<int64_t>(s0 + kMmaTile, a.len) - 1, 0, 0};
  t.k0 = sub_window_start(t.s0, a.len, a.kernel);
  t.n = sub_window_start(t.s1, a.len, a.kernel) + a.kernel - t.k0;
  NAT_MM_CHECK(t.n <= a.halo, "mma layout: a tile's halo (", message_int(t.n),
               ") exceeds the planned one (", message_int(a.halo), ")");
  return t;
}

// The key (flat row * width + column) each neighbor of each query of one tile reads,
// warp by warp and lane pair by lane pair as the kernels do.
void tile_keys(const AxisTile& y, const AxisTile& x, const Axis& ay, const Axis& ax,
               int64_t width, const MmaLayout& lay, int64_t* keys) {
  const int64_t kh = ay.kernel, kw = ax.kernel;
  for (int warp = 0; warp < kMmaWarps; ++warp) {
    const int64_t row_lo = mma_row_lo(warp, y.s0, y.s1, ay.len, kh, y.k0);
    TORCH_CHECK(row_lo >= 0 && row_lo * lay.pitch + lay.nk <= lay.slots,
                "mma layout: a warp range leaves the staged slots");
    for (int r = 0; r < 16; ++r) {
      const int64_t sh = y.s0 + (warp * 16 + r) / kMmaTile;
      const int64_t sw = x.s0 + (warp * 16 + r) % kMmaTile;
      if (sh > y.s1 || sw > x.s1) continue;  // a clamped duplicate: writes nothing
      const int64_t first = mma_first_slot(sub_window_start(sh, ay.len, kh),
                                           sub_window_start(sw, ax.len, kw), y.k0, x.k0,
                                           row_lo, lay.pitch);
      int64_t* q = keys + ((sh * ay.dilation + ay.residue) * width + sw * ax.dilation +
                           ax.residue) * kh * kw;
      for (int64_t e = 0; e < kh * kw; ++e) {
        const int64_t slot = first + (e / kw) * lay.pitch + e % kw;
        TORCH_CHECK(slot >= 0 && slot < lay.nk, "mma layout: slot outside the GEMM");
        const int64_t staged = row_lo * lay.pitch + slot;
        const int64_t hr = staged / lay.pitch, hc = staged % lay.pitch;
        TORCH_CHECK(hr < y.n && hc < x.n, "mma layout: a neighbor reads a zero slot");
        q[e] = ((y.k0 + hr) * ay.dilation + ay.residue) * width +
               (x.k0 + hc) * ax.dilation + ax.residue;
      }
    }
  }
}

// One axis of one key tile: key positions [s0, s1] and the query halo [q0, q0 + n) of the
// queries that see them.
AxisTile axis_key_tile(int64_t s0, const Axis& a) {
  AxisTile t{s0, std::min<int64_t>(s0 + kMmaTile, a.len) - 1, 0, 0};
  t.k0 = sub_inverse_first(t.s0, a.kernel);
  t.n = sub_inverse_last(t.s1, a.len, a.kernel) + 1 - t.k0;
  NAT_MM_CHECK(t.n <= a.halo, "mma layout: a key tile's halo (", message_int(t.n),
               ") exceeds the planned one (", message_int(a.halo), ")");
  return t;
}

// The key side, warp by warp and key by key as the kernel gathers: for every query that
// sees the key, the slot it reads in the warp's query range; records the key as the
// neighbor (query, m * kw + n) it stands for, which must not have been recorded before.
void key_tile_pairs(const AxisTile& y, const AxisTile& x, const Axis& ay, const Axis& ax,
                    int64_t width, const MmaLayout& lay, int64_t rows, int64_t* pairs) {
  const int64_t kh = ay.kernel, kw = ax.kernel;
  for (int warp = 0; warp < kMmaWarps; ++warp) {
    const int64_t row_lo = mma_key_row_lo(warp, y.s0, y.s1, ay.len, kh, y.k0, y.n, rows);
    TORCH_CHECK(row_lo >= 0 && row_lo * lay.pitch + lay.nk <= lay.slots,
                "mma layout: a key warp range leaves the staged slots");
    for (int r = 0; r < 16; ++r) {
      const int64_t kr = y.s0 + (warp * 16 + r) / kMmaTile;
      const int64_t kc = x.s0 + (warp * 16 + r) % kMmaTile;
      if (kr > y.s1 || kc > x.s1) continue;
      const int64_t key = (kr * ay.dilation + ay.residue) * width + kc * ax.dilation + ax.residue;
      for (int64_t qr = sub_inverse_first(kr, kh); qr <= sub_inverse_last(kr, ay.len, kh); ++qr) {
        for (int64_t qc = sub_inverse_first(kc, kw); qc <= sub_inverse_last(kc, ax.len, kw);
             ++qc) {
          const int64_t slot = (qr - y.k0 - row_lo) * lay.pitch + qc - x.k0;
          TORCH_CHECK(slot >= 0 && slot < lay.nk, "mma layout: a query outside the key GEMM");
          TORCH_CHECK(qr - y.k0 < y.n && qc - x.k0 < x.n, "mma layout: a query not staged");
          const int64_t m = kr - sub_window_start(qr, ay.len, kh);
          const int64_t n = kc - sub_window_start(qc, ax.len, kw);
          TORCH_CHECK(m >= 0 && m < kh && n >= 0 && n < kw,
                      "mma layout: a query that does not see the key");
          int64_t* entry = pairs + ((qr * ay.dilation + ay.residue) * width +
                                    qc * ax.dilation + ax.residue) * kh * kw + m * kw + n;
          TORCH_CHECK(*entry == -1, "mma layout: a (query, neighbor) pair gathered twice");
          *entry = key;
        }
      }
    }
  }
}

void check_map(int64_t height, int64_t width, int64_t kh, int64_t kw, int64_t dh,
               int64_t dw) {
  NAT_MM_CHECK(kh >= 1 && kw >= 1 && dh >= 1 && dw >= 1 && height >= kh * dh &&
                   width >= kw * dw,
               "nat_mm: mma layout check: the map must hold kernel*dilation");
}

// Calls tile(rows axis, columns axis, s0h, s0w) for every tile of every residue class, as
// the kernels' grids cover them.
template <typename F>
void for_each_map_tile(int64_t height, int64_t width, int64_t kh, int64_t kw, int64_t dh,
                       int64_t dw, const MmaHalo& halo, F&& tile) {
  for (int64_t ri = 0; ri < dh; ++ri) {
    const Axis ay{subgrid_length(height, dh, ri), kh, halo.halo_h, dh, ri};
    for (int64_t rj = 0; rj < dw; ++rj) {
      const Axis ax{subgrid_length(width, dw, rj), kw, halo.halo_w, dw, rj};
      for (int64_t s0h = 0; s0h < ay.len; s0h += kMmaTile) {
        for (int64_t s0w = 0; s0w < ax.len; s0w += kMmaTile) tile(ay, ax, s0h, s0w);
      }
    }
  }
}

}  // namespace

at::Tensor mma_key_side_pairs(int64_t height, int64_t width, int64_t kh, int64_t kw,
                              int64_t dh, int64_t dw) {
  check_map(height, width, kh, kw, dh, dw);
  at::Tensor out = at::full({height, width, kh * kw}, -1, at::kLong);
  const MmaHalo halo = mma_halo(height, width, kh, kw, dh, dw, true);
  const MmaLayout lay = mma_key_layout(halo.halo_h, halo.halo_w, halo.rows);
  for_each_map_tile(height, width, kh, kw, dh, dw, halo, [&](const Axis& ay, const Axis& ax,
                                                              int64_t s0h, int64_t s0w) {
    key_tile_pairs(axis_key_tile(s0h, ay), axis_key_tile(s0w, ax), ay, ax, width, lay,
                   halo.rows, out.data_ptr<int64_t>());
  });
  return out;
}

at::Tensor mma_neighbor_keys(int64_t height, int64_t width, int64_t kh, int64_t kw,
                             int64_t dh, int64_t dw) {
  check_map(height, width, kh, kw, dh, dw);
  at::Tensor out = at::full({height, width, kh * kw}, -1, at::kLong);
  const MmaHalo halo = mma_halo(height, width, kh, kw, dh, dw, false);
  const MmaLayout lay = mma_layout(halo.halo_h, halo.halo_w, kh);
  for_each_map_tile(height, width, kh, kw, dh, dw, halo, [&](const Axis& ay, const Axis& ax,
                                                              int64_t s0h, int64_t s0w) {
    tile_keys(axis_tile(s0h, ay), axis_tile(s0w, ax), ay, ax, width, lay,
              out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace nat_mm
