// Tiles of the fused CUDA kernels (forward and backward share all of this).
//
// A query tile is th x tw queries of one (batch, head) and one dilation residue class:
// with dilation d, queries (s*d + r) only see keys of residue r, so on the sub-grid of one
// residue class a tile's keys form a contiguous halo of at most
// (th + kh - 1) x (tw + kw - 1) keys (window starts are monotone in the query).
// A key tile (the backward's key side) is the mirror image: th x tw keys and the halo of
// queries that see them, at most (th + 2(kh - 1)) x (tw + 2(kw - 1)) (border queries share
// a clamped window, so border keys are seen by up to k + k/2 queries per axis).
// The block stages two [halo, head_dim] tensors (keys and values, or queries and output
// gradients) and the head's rpb table in shared memory.
#pragma once

#include <type_traits>

#include "na2d_cuda_common.cuh"

namespace nat_mm {
namespace cuda_detail {

struct TileConfig {
  int th, tw;                // queries per tile (sub-grid rows, columns)
  int halo_h, halo_w;        // largest halo (key rows, columns) a tile can need
  int stride;                // elements between two keys in shared memory (>= dim)
  int key_tile;              // 1: tiles of keys with a halo of queries
  int64_t tiles_h, tiles_w;  // tiles per residue class along each axis
  int64_t total_tiles;
  int64_t bias_offset;  // byte offset of the float32 rpb copy in shared memory
  int64_t smem_bytes;
};

// Row stride (in elements) of a key in shared memory: at least dim, padded so that the
// 32/G query groups of a warp, reading neighbor keys of adjacent columns, hit disjoint banks.
inline int choose_stride(int64_t dim, int elem_bytes, int G) {
  const int64_t natural_words = (dim * elem_bytes + 3) / 4;
  const int per_word = 4 / elem_bytes;  // elements per 32-bit word (1 or 2)
  const int width_words = (G * elem_bytes + 3) / 4;
  const int groups = 32 / G;
  for (int64_t s = natural_words; s < natural_words + 32; ++s) {
    bool used[32] = {false};
    bool ok = true;
    for (int gi = 0; gi < groups && ok; ++gi) {
      for (int w = 0; w < width_words; ++w) {
        const int bank = static_cast<int>((gi * s + w) % 32);
        if (used[bank]) {
          ok = false;
          break;
        }
        used[bank] = true;
      }
    }
    if (ok) return static_cast<int>(s * per_word);
  }
  return static_cast<int>(natural_words * per_word);
}

// Tile shape for G threads per query and 256 threads: 8 columns (a warp spans 32/G
// adjacent queries of a row) and 256/(8G) rows; rows halved while shared memory is short.
inline bool plan_tiles(const Geometry& g, int G, int elem_bytes, int64_t smem_limit,
                       bool key_tile, TileConfig& tc) {
  const int64_t reach = key_tile ? 2 : 1;  // halo = tile + reach * (k - 1)
  const int tw = 8;
  const int64_t sub_h = (g.height + g.dh - 1) / g.dh;  // longest sub-grid (residue 0)
  const int64_t sub_w = (g.width + g.dw - 1) / g.dw;
  for (int th = kThreads / (tw * G); th >= 1; th /= 2) {
    if ((th * tw * G) % 32 != 0) break;
    const int64_t halo_h = std::min<int64_t>(th + reach * (g.kh - 1), sub_h);
    const int64_t halo_w = std::min<int64_t>(tw + reach * (g.kw - 1), sub_w);
    const int stride = choose_stride(g.dim, elem_bytes, G);
    const int64_t kv_bytes = 2 * halo_h * halo_w * stride * elem_bytes;
    const int64_t bias_offset = (kv_bytes + 15) / 16 * 16;
    const int64_t smem = bias_offset + g.bias_h * g.bias_w * static_cast<int64_t>(sizeof(float));
    if (smem <= smem_limit) {
      tc.th = th;
      tc.tw = tw;
      tc.halo_h = static_cast<int>(halo_h);
      tc.halo_w = static_cast<int>(halo_w);
      tc.stride = stride;
      tc.key_tile = key_tile ? 1 : 0;
      tc.tiles_h = (sub_h + th - 1) / th;
      tc.tiles_w = (sub_w + tw - 1) / tw;
      tc.total_tiles = g.bh * g.dh * g.dw * tc.tiles_h * tc.tiles_w;
      tc.bias_offset = bias_offset;
      tc.smem_bytes = smem;
      return true;
    }
  }
  return false;
}

// Plans the tiles for G threads per query and launches `kernel(args..., g, scale, tc)` with
// one block per tile (grid-stride over tiles past 2^20); false when the halo does not fit
// shared memory (the caller then takes the simple kernels).
template <typename T, int G, typename Kernel, typename... Args>
bool launch_tiled(Kernel kernel, bool key_tile, const Geometry& g, float scale, int device,
                  cudaStream_t stream, Args... args) {
  const DeviceLimits lim = device_limits(device);
  TileConfig tc;
  if (!plan_tiles(g, G, sizeof(T), lim.smem_optin, key_tile, tc)) return false;
  if (tc.smem_bytes > lim.smem_default) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(tc.smem_bytes)));
  }
  const int threads = tc.th * tc.tw * G;
  const int64_t cap = int64_t(1) << 20;
  const unsigned int grid =
      static_cast<unsigned int>(tc.total_tiles < cap ? tc.total_tiles : cap);
  launch_kernel(kernel, grid, threads, tc.smem_bytes, stream, args..., g, scale, tc);
  return true;
}

// Where one tile lies: its residue class, its positions [s0, s1] and its halo
// [k0, k0 + n) on the sub-grid (of length len), per axis.
struct Tile {
  int64_t bh, ri, rj;
  int64_t len_h, len_w;
  int64_t s0h, s0w, s1h, s1w;
  int64_t k0h, k0w, nh, nw;
  int64_t plane;  // offset of the (batch, head) map, in queries
};

// Halo [first, first + count) of sub-grid positions [s0, s1] of one axis: the keys that
// they see (query tile) or the queries that see them (key tile).
__device__ __forceinline__ void halo_span(int64_t s0, int64_t s1, int64_t residue,
                                          int64_t length, int64_t kernel, int64_t dilation,
                                          bool key_tile, int64_t& first, int64_t& count) {
  if (key_tile) {
    first = axis_inverse(s0 * dilation + residue, length, kernel, dilation).first;
    count = axis_inverse(s1 * dilation + residue, length, kernel, dilation).last + 1 - first;
  } else {
    first = axis_window(s0 * dilation + residue, length, kernel, dilation).start;
    count = axis_window(s1 * dilation + residue, length, kernel, dilation).start + kernel - first;
  }
}


// False when the tile lies past its residue class's sub-grid (uniform over the block).
__device__ __forceinline__ bool locate_tile(int64_t tile, const Geometry& g,
                                            const TileConfig& tc, Tile& t) {
  const int64_t tcol = tile % tc.tiles_w;
  tile /= tc.tiles_w;
  const int64_t trow = tile % tc.tiles_h;
  tile /= tc.tiles_h;
  t.rj = tile % g.dw;
  tile /= g.dw;
  t.ri = tile % g.dh;
  t.bh = tile / g.dh;
  t.len_h = subgrid_length(g.height, g.dh, t.ri);
  t.len_w = subgrid_length(g.width, g.dw, t.rj);
  t.s0h = trow * tc.th;
  t.s0w = tcol * tc.tw;
  if (t.s0h >= t.len_h || t.s0w >= t.len_w) return false;
  t.s1h = (t.s0h + tc.th < t.len_h ? t.s0h + tc.th : t.len_h) - 1;
  t.s1w = (t.s0w + tc.tw < t.len_w ? t.s0w + tc.tw : t.len_w) - 1;
  halo_span(t.s0h, t.s1h, t.ri, g.height, g.kh, g.dh, tc.key_tile, t.k0h, t.nh);
  halo_span(t.s0w, t.s1w, t.rj, g.width, g.kw, g.dw, tc.key_tile, t.k0w, t.nw);
  t.plane = t.bh * g.height * g.width;
  return true;
}

// Shared memory layout: keys [halo_h][halo_w][stride], values likewise (input dtype; for
// key tiles: queries and output gradients), then the head's rpb table in float32.
template <typename T>
struct TileSmem {
  T* keys;
  T* values;
  float* bias;
};

template <typename T>
__device__ __forceinline__ TileSmem<T> tile_smem(unsigned char* raw, const TileConfig& tc) {
  TileSmem<T> s;
  s.keys = reinterpret_cast<T*>(raw);
  s.values = s.keys + static_cast<int64_t>(tc.halo_h) * tc.halo_w * tc.stride;
  s.bias = reinterpret_cast<float*>(raw + tc.bias_offset);
  return s;
}

// The whole block copies the tile's key/value halo (coalesced along head_dim) and the rpb
// table into shared memory. Callers synchronize before (previous readers) and after.
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ key, const T* __restrict__ value,
                                          const T* __restrict__ rpb, const TileSmem<T>& s,
                                          const Geometry& g, const TileConfig& tc,
                                          const Tile& t) {
  const int64_t D = g.dim;
  const int64_t count = t.nh * t.nw * D;
  for (int64_t e = threadIdx.x; e < count; e += blockDim.x) {
    const int64_t kk = div_fast(e, D);
    const int64_t d = e - kk * D;
    const int64_t hr = div_fast(kk, t.nw);
    const int64_t hc = kk - hr * t.nw;
    const int64_t src =
        (t.plane + ((t.k0h + hr) * g.dh + t.ri) * g.width + (t.k0w + hc) * g.dw + t.rj) * D + d;
    const int64_t dst = (hr * tc.halo_w + hc) * tc.stride + d;
    s.keys[dst] = key[src];
    s.values[dst] = value[src];
  }
  if (rpb != nullptr) {
    const int64_t bins = g.bias_h * g.bias_w;
    const int64_t h = t.bh % g.heads;
    for (int64_t e = threadIdx.x; e < bins; e += blockDim.x) {
      s.bias[e] = static_cast<float>(rpb[h * bins + e]);
    }
  }
}

// This thread's query (key, in a key tile) in the tile. Threads past the tile's edge take a
// clamped duplicate (active = false) so that every lane joins the warp shuffles; they
// write nothing.
struct TileQuery {
  bool active;
  int64_t index;     // flat query index (into [B*heads*H*W])
  int64_t sub_h, sub_w;  // its sub-grid position
  int64_t key_row0;  // halo offset (row * halo_w + col) of neighbor (0, 0)
  int64_t bias0;     // rpb offset (row * bias_w + col) of neighbor (0, 0)
};

__device__ __forceinline__ TileQuery tile_query(int group, const Geometry& g,
                                                const TileConfig& tc, const Tile& t) {
  const int qr = group / tc.tw;
  const int qc = group - qr * tc.tw;
  TileQuery q;
  q.active = t.s0h + qr <= t.s1h && t.s0w + qc <= t.s1w;
  const int64_t sh = t.s0h + qr <= t.s1h ? t.s0h + qr : t.s1h;
  const int64_t sw = t.s0w + qc <= t.s1w ? t.s0w + qc : t.s1w;
  q.index = t.plane + (sh * g.dh + t.ri) * g.width + sw * g.dw + t.rj;
  q.sub_h = sh;
  q.sub_w = sw;
  // the window on the residue's sub-grid (what axis_window gives, without its divisions)
  const int64_t start_h = sub_window_start(sh, t.len_h, g.kh);
  const int64_t start_w = sub_window_start(sw, t.len_w, g.kw);
  q.key_row0 = (start_h - t.k0h) * tc.halo_w + (start_w - t.k0w);
  q.bias0 = (start_h - sh + g.kh - 1) * g.bias_w + (start_w - sw + g.kw - 1);
  return q;
}

// The block walks its tiles (grid-stride): stage(tile) with the whole block, then
// body(tile); shared memory is restaged only after every thread is done with the last tile.
template <typename Stage, typename Body>
__device__ __forceinline__ void walk_tiles(const Geometry& g, const TileConfig& tc,
                                           Stage&& stage, Body&& body) {
  for (int64_t tile = blockIdx.x; tile < tc.total_tiles; tile += gridDim.x) {
    Tile t;
    if (!locate_tile(tile, g, tc, t)) continue;  // uniform over the block
    __syncthreads();  // the previous tile's readers are done with shared memory
    stage(static_cast<const Tile&>(t));
    __syncthreads();
    body(static_cast<const Tile&>(t));
  }
}

// walk_tiles with each tile's halo staged by load_tile, calling body(position, tile) for
// this thread's query (or key) of the tile.
template <typename T, typename Body>
__device__ __forceinline__ void for_each_tile(const T* __restrict__ key,
                                              const T* __restrict__ value,
                                              const T* __restrict__ rpb, const TileSmem<T>& sm,
                                              const Geometry& g, const TileConfig& tc, int group,
                                              Body&& body) {
  walk_tiles(g, tc, [&](const Tile& t) { load_tile(key, value, rpb, sm, g, tc, t); },
             [&](const Tile& t) { body(tile_query(group, g, tc, t), t); });
}

// The queries that see key (sub_h, sub_w) of tile t (on its residue's sub-grid; clamped
// windows, so the ranges come from the inverse window and the neighbor index is key - the
// query's window start): f(map entry of (query, neighbor), query sub row, query sub column)
// for every col_step-th column of the range from its col_offset-th on.
template <typename F>
__device__ __forceinline__ void for_each_query_of_key(int64_t sub_h, int64_t sub_w,
                                                      const Tile& t, const Geometry& g,
                                                      int col_offset, int col_step, F&& f) {
  const int64_t last_h = sub_inverse_last(sub_h, t.len_h, g.kh);
  const int64_t first_w = sub_inverse_first(sub_w, g.kw);
  const int64_t last_w = sub_inverse_last(sub_w, t.len_w, g.kw);
  for (int64_t qh = sub_inverse_first(sub_h, g.kh); qh <= last_h; ++qh) {
    const int64_t m = sub_h - sub_window_start(qh, t.len_h, g.kh);
    const int64_t map_row = (t.plane + (qh * g.dh + t.ri) * g.width) * g.window + m * g.kw;
    for (int64_t qw = first_w + col_offset; qw <= last_w; qw += col_step) {
      const int64_t n = sub_w - sub_window_start(qw, t.len_w, g.kw);
      f(map_row + (qw * g.dw + t.rj) * g.window + n, qh, qw);
    }
  }
}

// Sum over the G lanes of one query's group (all lanes of the group get the sum).
template <int G>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Calls f(T{}) with the element type T of the tiled kernels (float16, bfloat16, float32);
// false for other dtypes and when NAT_MM_CUDA_FORCE_SIMPLE is set.
template <typename F>
bool with_tiled_type(at::ScalarType type, F&& f) {
  if (force_simple()) return false;
  switch (type) {
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kFloat:
      return f(float{});
    default:
      return false;
  }
}

// Threads per query G and channels per thread DPT (G * DPT >= head_dim) by head_dim:
// calls f(integral_constant G, integral_constant DPT); false past head_dim 256.
template <typename F>
bool with_group_shape(int64_t dim, F&& f) {
  using std::integral_constant;
  if (dim <= 16) return f(integral_constant<int, 4>{}, integral_constant<int, 4>{});
  if (dim <= 32) return f(integral_constant<int, 4>{}, integral_constant<int, 8>{});
  if (dim <= 64) return f(integral_constant<int, 4>{}, integral_constant<int, 16>{});
  if (dim <= 128) return f(integral_constant<int, 8>{}, integral_constant<int, 16>{});
  if (dim <= 256) return f(integral_constant<int, 16>{}, integral_constant<int, 16>{});
  return false;
}

}  // namespace cuda_detail
}  // namespace nat_mm
