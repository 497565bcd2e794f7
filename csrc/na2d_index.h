// Window and bias index math of 2D neighborhood attention, shared by the CPU and CUDA
// kernels (host + device inline functions). See docs/semantics.md for the definition.
//
// Per axis of length L, kernel k (odd), dilation d, query index i:
//   residue r = i % d, sub-grid length Ls = ceil((L - r) / d), sub index s = i / d
//   window start on the sub-grid: clamp(s - k/2, 0, Ls - k)
//   neighbor n (0..k-1) is key (start + n) * d + r; its bias index is start + n - s + k - 1.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NAT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NAT_HOST_DEVICE inline
#endif

namespace nat_mm {

// Number of indices in [0, length) congruent to `residue` modulo `dilation`.
NAT_HOST_DEVICE int64_t subgrid_length(int64_t length, int64_t dilation, int64_t residue) {
  return (length - residue + dilation - 1) / dilation;
}

// One axis of one query: where its window starts (in sub-grid units) and how to map
// sub-grid positions back to the full axis.
struct AxisWindow {
  int64_t start;    // first neighbor, sub-grid index
  int64_t sub;      // the query's own sub-grid index
  int64_t residue;  // index % dilation
  int64_t dilation;

  // Full-axis index of neighbor n.
  NAT_HOST_DEVICE int64_t key(int64_t n) const { return (start + n) * dilation + residue; }
  // Index into the rpb axis (size 2k-1) for neighbor n.
  NAT_HOST_DEVICE int64_t bias(int64_t n, int64_t kernel) const {
    return start + n - sub + kernel - 1;
  }
};

// Window start of sub-grid position `sub` on a sub-grid of length sub_len: centered, then
// clamped so that the window stays inside.
NAT_HOST_DEVICE int64_t sub_window_start(int64_t sub, int64_t sub_len, int64_t kernel) {
  const int64_t start = sub - kernel / 2;
  const int64_t last_start = sub_len - kernel;
  return start < 0 ? 0 : (start > last_start ? last_start : start);
}

NAT_HOST_DEVICE AxisWindow axis_window(int64_t index, int64_t length, int64_t kernel,
                                       int64_t dilation) {
  AxisWindow w;
  w.residue = index % dilation;
  w.sub = index / dilation;
  w.dilation = dilation;
  w.start = sub_window_start(w.sub, subgrid_length(length, dilation, w.residue), kernel);
  return w;
}

// The queries that see a given key, along one axis: sub-grid indices [first, last] of
// queries with the key's residue. For such a query q, the key is neighbor
// (key_sub - axis_window(q).start).
struct InverseRange {
  int64_t first;
  int64_t last;
  int64_t residue;
  int64_t dilation;
  NAT_HOST_DEVICE int64_t query(int64_t sub) const { return sub * dilation + residue; }
};

// On one sub-grid (length sub_len): the smallest query whose window end reaches key_sub,
// and the largest whose window start is <= key_sub.
NAT_HOST_DEVICE int64_t sub_inverse_first(int64_t key_sub, int64_t kernel) {
  return key_sub - kernel + 1 <= 0 ? 0 : key_sub - kernel / 2;
}
NAT_HOST_DEVICE int64_t sub_inverse_last(int64_t key_sub, int64_t sub_len, int64_t kernel) {
  return key_sub >= sub_len - kernel ? sub_len - 1 : key_sub + kernel / 2;
}

NAT_HOST_DEVICE InverseRange axis_inverse(int64_t key_index, int64_t length, int64_t kernel,
                                          int64_t dilation) {
  InverseRange r;
  r.residue = key_index % dilation;
  r.dilation = dilation;
  const int64_t key_sub = key_index / dilation;
  r.first = sub_inverse_first(key_sub, kernel);
  r.last = sub_inverse_last(key_sub, subgrid_length(length, dilation, r.residue), kernel);
  return r;
}

// True when queries [index, index + count) of one axis all have unclamped windows, so
// neighbor n of query index + t is key index + t + (n - k/2) * d: one uniform shift.
NAT_HOST_DEVICE bool axis_run_is_interior(int64_t index, int64_t count, int64_t length,
                                          int64_t kernel, int64_t dilation) {
  const int64_t reach = (kernel / 2) * dilation;
  return index - reach >= 0 && index + count - 1 + reach <= length - 1;
}

}  // namespace nat_mm
