// Walks the tensor-core kernels' tiles on the host with their layout functions
// (na2d_mma_layout.h) and reports which key every neighbor of every query reads from the
// staged halo, so that CPU tests can compare it with the definition of the window.
#include "mma_layout_check.h"

#include <ATen/ops/full.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "na2d_checks.h"  // message_int
#include "na2d_mma_layout.h"

namespace nat_mm {

at::Tensor mma_neighbor_keys(int64_t height, int64_t width, int64_t kh, int64_t kw,
                             int64_t dh, int64_t dw) {
  TORCH_CHECK(kh >= 1 && kw >= 1 && dh >= 1 && dw >= 1 && height >= kh * dh &&
                  width >= kw * dw,
              "nat_mm: mma_neighbor_keys: the map must hold kernel*dilation");
  at::Tensor out = at::full({height, width, kh * kw}, -1, at::kLong);
  int64_t* keys = out.data_ptr<int64_t>();
  const int64_t halo_h = std::min<int64_t>(kMmaTile + kh - 1, (height + dh - 1) / dh);
  const int64_t halo_w = std::min<int64_t>(kMmaTile + kw - 1, (width + dw - 1) / dw);
  const MmaLayout lay = mma_layout(halo_h, halo_w, kh);
  for (int64_t ri = 0; ri < dh; ++ri) {
    const int64_t len_h = subgrid_length(height, dh, ri);
    for (int64_t rj = 0; rj < dw; ++rj) {
      const int64_t len_w = subgrid_length(width, dw, rj);
      for (int64_t s0h = 0; s0h < len_h; s0h += kMmaTile) {
        const int64_t s1h = std::min<int64_t>(s0h + kMmaTile, len_h) - 1;
        const int64_t k0h = sub_window_start(s0h, len_h, kh);
        const int64_t nh = sub_window_start(s1h, len_h, kh) + kh - k0h;
        TORCH_CHECK(nh <= halo_h, "mma layout: halo rows ", message_int(nh), " > ",
                    message_int(halo_h));
        for (int64_t s0w = 0; s0w < len_w; s0w += kMmaTile) {
          const int64_t s1w = std::min<int64_t>(s0w + kMmaTile, len_w) - 1;
          const int64_t k0w = sub_window_start(s0w, len_w, kw);
          const int64_t nw = sub_window_start(s1w, len_w, kw) + kw - k0w;
          TORCH_CHECK(nw <= halo_w, "mma layout: halo columns ", message_int(nw), " > ",
                      message_int(halo_w));
          for (int warp = 0; warp < kMmaWarps; ++warp) {
            const int64_t row_lo = mma_row_lo(warp, s0h, s1h, len_h, kh, k0h);
            TORCH_CHECK(row_lo >= 0 && row_lo * lay.pitch + lay.nk <= lay.slots,
                        "mma layout: a warp range leaves the staged slots");
            for (int r = 0; r < 16; ++r) {
              const int64_t sh = s0h + (warp * 16 + r) / kMmaTile;
              const int64_t sw = s0w + (warp * 16 + r) % kMmaTile;
              if (sh > s1h || sw > s1w) continue;  // a clamped duplicate: writes nothing
              const int64_t first =
                  mma_first_slot(sh, sw, len_h, len_w, kh, kw, k0h, k0w, row_lo, lay.pitch);
              int64_t* q = keys + ((sh * dh + ri) * width + sw * dw + rj) * kh * kw;
              for (int64_t m = 0; m < kh; ++m) {
                for (int64_t n = 0; n < kw; ++n) {
                  const int64_t slot = first + m * lay.pitch + n;
                  TORCH_CHECK(slot >= 0 && slot < lay.nk, "mma layout: slot outside the GEMM");
                  const int64_t staged = row_lo * lay.pitch + slot;
                  const int64_t hr = staged / lay.pitch, hc = staged % lay.pitch;
                  TORCH_CHECK(hr < nh && hc < nw, "mma layout: a neighbor reads a zero slot");
                  q[m * kw + n] = ((k0h + hr) * dh + ri) * width + (k0w + hc) * dw + rj;
                }
              }
            }
          }
        }
      }
    }
  }
  return out;
}

}  // namespace nat_mm
