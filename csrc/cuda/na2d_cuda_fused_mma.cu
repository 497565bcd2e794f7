// Fused neighborhood attention on tensor cores (float16/bfloat16, sm_80+, head_dim
// 16/32/64/128; opt-in with NAT_MM_CUDA_TENSOR_CORES=1 until verified on a GPU): the
// forward, flash-attention style (no attention map in memory), and the backward's query
// side (p, ds and grad_q) and key side (grad_k, grad_v).
//
// A block takes a tile of 8 x 8 queries of one (batch, head) and one dilation residue class
// (the tiles of na2d_cuda_tile.cuh) and stages the keys and values of the tile's halo, the
// 64 queries and the rpb table in shared memory. Each of its 4 warps owns 16 queries: two
// query rows of the tile. Their windows lie in kh + 1 consecutive halo rows, which are
// contiguous in shared memory (a halo row holds the whole tile's width), so the warp
// computes its logits as one dense GEMM on tensor cores (wmma 16x16x16, float32
// accumulation): S = Q [16 x D] . K^T [D x NK], NK = (kh + 1) * halo pitch rounded up to 16
// (~2.3 x the kh*kw logits a query needs at k = 7). The softmax then reads each query's
// kh x kw window out of S (scale and rpb in float32), writes exp(s - max) as float16/
// bfloat16 into a zeroed [16 x NK] probability block, and O = P . V is the second GEMM.
// The backward recomputes S, adds dP = dO [16 x D] . V^T as a second GEMM of the same
// shape, and grad_q = scale * dS . K mirrors P . V.
// The key side takes tiles of 8 x 8 keys and stages the halo of queries that see them (q
// and grad_out rows). Each warp owns 16 keys; the queries that see them lie in `rows`
// consecutive halo rows (na2d_mma_layout.h), so grad_v = P^T . dO and grad_k = scale *
// dS^T . Q are the second GEMM again, over [16 x nk] weights gathered from the query side's
// p and ds maps (each key's entries at its queries' slots, zeros elsewhere).
// Halo slots outside the map are zero in shared memory, so they add 0 (never 0 * NaN).
#include <initializer_list>

#include "na2d_cuda_common.cuh"
#include "na2d_cuda_tile.cuh"
#include "na2d_mma_layout.h"

#ifndef NAT_MM_CUDA_EMULATION  // the emulation (common.cuh) brings its own wmma and types
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

// The kernel bodies exist for sm_80+ device code (and the CPU emulation) only.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(NAT_MM_CUDA_EMULATION)
#define NAT_MM_MMA_DEVICE_CODE 1
#else
#define NAT_MM_MMA_DEVICE_CODE 0
#endif

namespace nat_mm {
namespace cuda_detail {

template <typename T>
struct MmaElement;
template <>
struct MmaElement<c10::Half> {
  using type = __half;
};
template <>
struct MmaElement<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Explicit conversions (torch builds with the implicit half/bfloat16 conversions disabled).
template <typename M>
struct Convert;
template <>
struct Convert<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Shared-memory plan of one launch; pitch, nk and slots are mma_layout's (na2d_mma_layout.h).
struct MmaConfig {
  TileConfig tile;  // tile grid and largest halo (rows x columns)
  int pitch;        // halo slots per halo row in shared memory
  int stride;       // elements per key / query row in shared memory (head_dim + 8)
  int nk;           // keys (key side: queries) per warp GEMM
  int rows;         // halo rows per warp range (kh + 1; key side: mma_key_range_rows)
  int s_ld, p_ld;   // row lengths of the per-warp float blocks and of the weight block
  int slots;        // key / value slots staged per tile
  // byte offsets: keys at 0, then values, queries, grad_out (backward), logits, logit
  // gradients (backward), weights (probabilities / ds in the input dtype), rpb, row stats
  int64_t off_v, off_q, off_g, off_s, off_d, off_p, off_bias, off_stats, smem_bytes;
};

inline int64_t align128(int64_t bytes) { return (bytes + 127) / 128 * 128; }

// The three tensor-core kernels.
enum class MmaPass { kForward, kQuerySide, kKeySide };

// Shared memory plan (2-byte elements). The forward stages the key/value halo, the tile's
// query rows, a float block per warp (logits, then output rows), the weights and the rpb
// table; the query side adds grad_out rows and a second float block (dP); the key side
// stages the query/grad_out halo (in the key/value places), the weights and a float block
// of output rows. False when it does not fit.
inline bool plan_mma(const Geometry& g, int64_t smem_limit, MmaPass pass, MmaConfig& mc) {
  TileConfig& tc = mc.tile;
  const int64_t sub_h = (g.height + g.dh - 1) / g.dh;  // longest sub-grid (residue 0)
  const int64_t sub_w = (g.width + g.dw - 1) / g.dw;
  const bool keys = pass == MmaPass::kKeySide, query_side = pass == MmaPass::kQuerySide;
  const MmaHalo halo = mma_halo(g.height, g.width, g.kh, g.kw, g.dh, g.dw, keys);
  const MmaLayout lay = keys ? mma_key_layout(halo.halo_h, halo.halo_w, halo.rows)
                             : mma_layout(halo.halo_h, halo.halo_w, g.kh);
  tc.halo_h = static_cast<int>(halo.halo_h);
  tc.halo_w = static_cast<int>(halo.halo_w);
  mc.rows = static_cast<int>(halo.rows);
  tc.th = kMmaTile;
  tc.tw = kMmaTile;
  tc.key_tile = keys ? 1 : 0;
  tc.tiles_h = (sub_h + kMmaTile - 1) / kMmaTile;
  tc.tiles_w = (sub_w + kMmaTile - 1) / kMmaTile;
  tc.total_tiles = g.bh * g.dh * g.dw * tc.tiles_h * tc.tiles_w;
  mc.pitch = static_cast<int>(lay.pitch);
  mc.stride = static_cast<int>(g.dim) + 8;
  mc.nk = static_cast<int>(lay.nk);
  mc.s_ld = static_cast<int>(keys ? g.dim : std::max<int64_t>(mc.nk, g.dim)) + 4;
  mc.p_ld = mc.nk + 8;
  mc.slots = static_cast<int>(lay.slots);
  const int64_t kv = align128(int64_t(mc.slots) * mc.stride * 2);
  const int64_t rows = keys ? 0 : align128(int64_t(kMmaWarps) * 16 * mc.stride * 2);
  const int64_t block = align128(int64_t(kMmaWarps) * 16 * mc.s_ld * 4);
  mc.off_v = kv;
  mc.off_q = mc.off_v + kv;
  mc.off_g = mc.off_q + rows;
  mc.off_s = mc.off_g + (query_side ? rows : 0);
  mc.off_d = mc.off_s + block;
  mc.off_p = mc.off_d + (query_side ? block : 0);
  mc.off_bias = mc.off_p + align128(int64_t(kMmaWarps) * 16 * mc.p_ld * 2);
  mc.off_stats = mc.off_bias + (keys ? 0 : align128(g.bias_h * g.bias_w * 4));
  mc.smem_bytes = mc.off_stats + kMmaWarps * 32 * 4;
  tc.bias_offset = mc.off_bias;
  tc.smem_bytes = mc.smem_bytes;
  return mc.smem_bytes <= smem_limit;
}

// 16-byte chunk copies (8 elements); global rows are 16-byte aligned (checked on the host).
__device__ __forceinline__ void copy16(void* dst, const void* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
__device__ __forceinline__ void zero16(void* dst) {
  *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ int64_t tile_index(const Tile& t, const Geometry& g, int64_t sh,
                                              int64_t sw) {
  return t.plane + (sh * g.dh + t.ri) * g.width + sw * g.dw + t.rj;
}

// Shared memory of one block, and this warp's parts of it.
template <typename M>
struct MmaSmem {
  M* keys;       // [slots][stride] halo keys (zeros outside the map)
  M* values;     // [slots][stride]
  M* queries;    // [64][stride] the tile's queries (clamped duplicates past its edge)
  M* grads;      // [64][stride] their grad_out rows (backward)
  float* bias;   // the head's rpb table
  float* s_w;    // [16][s_ld] this warp's logits, then its output rows
  float* d_w;    // [16][s_ld] this warp's logit gradients dP (backward)
  M* p_w;        // [16][p_ld] this warp's weights for the second GEMM
  float* row_w;  // [16] per-row output factor
};

template <typename M>
__device__ __forceinline__ MmaSmem<M> mma_smem(unsigned char* raw, const MmaConfig& mc,
                                               int warp) {
  MmaSmem<M> s;
  s.keys = reinterpret_cast<M*>(raw);
  s.values = reinterpret_cast<M*>(raw + mc.off_v);
  s.queries = reinterpret_cast<M*>(raw + mc.off_q);
  s.grads = reinterpret_cast<M*>(raw + mc.off_g);
  s.bias = reinterpret_cast<float*>(raw + mc.off_bias);
  s.s_w = reinterpret_cast<float*>(raw + mc.off_s) + warp * 16 * mc.s_ld;
  s.d_w = reinterpret_cast<float*>(raw + mc.off_d) + warp * 16 * mc.s_ld;
  s.p_w = reinterpret_cast<M*>(raw + mc.off_p) + warp * 16 * mc.p_ld;
  s.row_w = reinterpret_cast<float*>(raw + mc.off_stats) + warp * 32;
  return s;
}

// The whole block stages a halo of two tensors (keys and values; on the key side queries
// and grad_out), zeros outside the map.
template <typename M, int D>
__device__ __forceinline__ void stage_mma_halo(const M* a, const M* b, M* a_dst, M* b_dst,
                                               const Geometry& g, const MmaConfig& mc,
                                               const Tile& t) {
  constexpr int CHUNKS = D / 8;
  for (int e = threadIdx.x; e < mc.slots * CHUNKS; e += blockDim.x) {
    const int slot = e / CHUNKS, c = e - slot * CHUNKS;
    const int hr = slot / mc.pitch, hc = slot - hr * mc.pitch;
    M* ad = a_dst + slot * mc.stride + c * 8;
    M* bd = b_dst + slot * mc.stride + c * 8;
    if (hr < t.nh && hc < t.nw) {
      const int64_t src =
          (t.plane + ((t.k0h + hr) * g.dh + t.ri) * g.width + (t.k0w + hc) * g.dw + t.rj) * D +
          c * 8;
      copy16(ad, a + src);
      copy16(bd, b + src);
    } else {
      zero16(ad);
      zero16(bd);
    }
  }
}

// Each warp zeroes its weight block.
template <typename M>
__device__ __forceinline__ void zero_weights(const MmaSmem<M>& sm, const MmaConfig& mc) {
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 16 * mc.p_ld / 8; e += 32) zero16(sm.p_w + e * 8);
}

// The whole block stages a query tile: key/value halo, the 64 query rows (and grad_out rows
// when `grad_out` is given) and the rpb table; each warp zeroes its weight block.
template <typename M, int D, typename R>
__device__ __forceinline__ void stage_mma_tile(const M* key, const M* value, const M* query,
                                               const M* grad_out, const R* rpb,
                                               const MmaSmem<M>& sm, const Geometry& g,
                                               const MmaConfig& mc, const Tile& t) {
  constexpr int CHUNKS = D / 8;
  stage_mma_halo<M, D>(key, value, sm.keys, sm.values, g, mc, t);
  for (int e = threadIdx.x; e < kMmaTile * kMmaTile * CHUNKS; e += blockDim.x) {
    const int slot = e / CHUNKS, c = e - slot * CHUNKS;
    const int64_t sh = min64(t.s0h + slot / kMmaTile, t.s1h);  // clamped duplicate past
    const int64_t sw = min64(t.s0w + slot % kMmaTile, t.s1w);  // the tile's edge
    const int64_t src = tile_index(t, g, sh, sw) * D + c * 8;
    copy16(sm.queries + slot * mc.stride + c * 8, query + src);
    if (grad_out != nullptr) copy16(sm.grads + slot * mc.stride + c * 8, grad_out + src);
  }
  if (rpb != nullptr) {
    const int64_t bins = g.bias_h * g.bias_w;
    const int64_t h = t.bh % g.heads;
    for (int64_t e = threadIdx.x; e < bins; e += blockDim.x) {
      sm.bias[e] = static_cast<float>(rpb[h * bins + e]);
    }
  }
  zero_weights(sm, mc);
}

// The query that lanes 2r and 2r+1 of a warp share, and where its window lies in the
// warp's key range (which starts row_lo halo rows in).
struct LaneQuery {
  int r, half;
  bool active;
  int64_t index;  // flat query index
  int first;      // key-range slot of neighbor (0, 0)
  int64_t bias0;  // rpb offset of neighbor (0, 0)
};

__device__ __forceinline__ int warp_row_lo(int warp, const Geometry& g, const Tile& t) {
  return static_cast<int>(mma_row_lo(warp, t.s0h, t.s1h, t.len_h, g.kh, t.k0h));
}

__device__ __forceinline__ LaneQuery lane_query(int warp, int lane, int row_lo,
                                                const Geometry& g, const MmaConfig& mc,
                                                const Tile& t) {
  LaneQuery lq;
  lq.r = lane >> 1;
  lq.half = lane & 1;
  const int slot = warp * 16 + lq.r;
  const int64_t th = t.s0h + slot / kMmaTile, tw = t.s0w + slot % kMmaTile;
  lq.active = th <= t.s1h && tw <= t.s1w;
  const int64_t sh = min64(th, t.s1h), sw = min64(tw, t.s1w);
  lq.index = tile_index(t, g, sh, sw);
  const int64_t start_h = sub_window_start(sh, t.len_h, g.kh);
  const int64_t start_w = sub_window_start(sw, t.len_w, g.kw);
  lq.first = static_cast<int>(mma_first_slot(start_h, start_w, t.k0h, t.k0w, row_lo, mc.pitch));
  lq.bias0 = (start_h - sh + g.kh - 1) * g.bias_w + (start_w - sw + g.kw - 1);
  return lq;
}

// f(neighbor e, slot in the key range, scaled logit incl. rpb) for this lane's half of the
// query's window (entries e = half, half + 2, ...).
template <typename F>
__device__ __forceinline__ void for_lane_window(const LaneQuery& lq, const float* scores,
                                                int s_ld, bool with_bias, const float* bias,
                                                const Geometry& g, const MmaConfig& mc,
                                                float scale, F&& f) {
  const int window = static_cast<int>(g.window), kwid = static_cast<int>(g.kw);
  const float* row = scores + lq.r * s_ld;
  for (int e = lq.half; e < window; e += 2) {
    const int m = e / kwid, n = e - m * kwid;
    const int pos = lq.first + m * mc.pitch + n;
    float s = row[pos] * scale;
    if (with_bias) s += bias[lq.bias0 + m * g.bias_w + n];
    f(e, pos, s);
  }
}

// out[16 x nk] = a[16 x D] . keys[nk x D]^T (float32 accumulation), keys from the warp's range.
template <typename M, int KD>
__device__ __forceinline__ void warp_scores(const M* a, const M* keys, const MmaConfig& mc,
                                            float* out) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, M, wmma::row_major> fa[KD];
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) wmma::load_matrix_sync(fa[kk], a + kk * 16, mc.stride);
  for (int j = 0; j < mc.nk / 16; ++j) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, M, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, keys + j * 16 * mc.stride + kk * 16, mc.stride);
      wmma::mma_sync(acc, fa[kk], fb, acc);
    }
    wmma::store_matrix_sync(out + j * 16, acc, mc.s_ld, wmma::mem_row_major);
  }
}

// out[16 x D] = w[16 x nk] . src[nk x D] (float32 accumulation), src from the warp's range.
template <typename M, int KD>
__device__ __forceinline__ void warp_mix(const M* w, const M* src, const MmaConfig& mc,
                                         float* out) {
  using namespace nvcuda;
#pragma unroll
  for (int nt = 0; nt < KD; ++nt) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int j = 0; j < mc.nk / 16; ++j) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, M, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, M, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, w + j * 16, mc.p_ld);
      wmma::load_matrix_sync(fb, src + j * 16 * mc.stride + nt * 16, mc.stride);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(out + nt * 16, acc, mc.s_ld, wmma::mem_row_major);
  }
}

// dst row of each active query of the warp = rows[r] * row_w[r], 8 channels per store.
template <typename T, int D>
__device__ __forceinline__ void warp_store_rows(T* dst, const float* rows, const float* row_w,
                                                int warp, int lane, const Geometry& g,
                                                const MmaConfig& mc, const Tile& t) {
  using M = typename MmaElement<T>::type;
  constexpr int CHUNKS = D / 8;
  for (int e = lane; e < 16 * CHUNKS; e += 32) {
    const int rr = e / CHUNKS, c = e - rr * CHUNKS;
    const int slot = warp * 16 + rr;
    const int64_t sh = t.s0h + slot / kMmaTile, sw = t.s0w + slot % kMmaTile;
    if (sh > t.s1h || sw > t.s1w) continue;
    const float f = row_w[rr];
    const float* o = rows + rr * mc.s_ld + c * 8;
    __align__(16) M vals[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) vals[u] = Convert<M>::from(o[u] * f);
    copy16(dst + tile_index(t, g, sh, sw) * D + c * 8, vals);
  }
}

// What one warp works on in one tile.
template <typename M>
struct WarpTile {
  MmaSmem<M> sm;       // shared memory, with this warp's blocks
  int warp, lane;
  Tile t;
  LaneQuery lq;        // the query of this lane pair
  const M* keys;       // the warp's key range (row_lo halo rows into the staged halo)
  const M* values;
  const M* queries;    // the warp's 16 staged query rows
  const M* grads;      // their grad_out rows (backward)
};

// The query tiles: stages each one (grad_out rows too when given) and calls body(WarpTile)
// for this warp's 16 queries.
template <typename T, int D, typename Body>
__device__ __forceinline__ void for_each_mma_tile(const T* key, const T* value, const T* query,
                                                  const T* grad_out, const T* rpb,
                                                  const Geometry& g, const MmaConfig& mc,
                                                  Body&& body) {
  using M = typename MmaElement<T>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto in = [](const T* x) { return reinterpret_cast<const M*>(x); };
  WarpTile<M> w;
  w.warp = threadIdx.x / 32;
  w.lane = threadIdx.x & 31;
  w.sm = mma_smem<M>(smem_raw, mc, w.warp);
  w.queries = w.sm.queries + w.warp * 16 * mc.stride;
  w.grads = w.sm.grads + w.warp * 16 * mc.stride;
  walk_tiles(g, mc.tile, [&](const Tile& t) {
    stage_mma_tile<M, D>(in(key), in(value), in(query), grad_out ? in(grad_out) : nullptr, rpb,
                         w.sm, g, mc, t);
  }, [&](const Tile& t) {
    w.t = t;
    const int row_lo = warp_row_lo(w.warp, g, t);
    const int64_t first = int64_t(row_lo) * mc.pitch * mc.stride;
    w.keys = w.sm.keys + first;
    w.values = w.sm.values + first;
    w.lq = lane_query(w.warp, w.lane, row_lo, g, mc, t);
    body(static_cast<const WarpTile<M>&>(w));
  });
}

// ------------------------------------------------------------------ forward
template <typename T, int KD>  // KD = head_dim / 16
__global__ void __launch_bounds__(kMmaWarps * 32)
    fused_fwd_mma_kernel(const T* __restrict__ query, const T* __restrict__ key,
                         const T* __restrict__ value, const T* __restrict__ rpb,
                         T* __restrict__ out, float* __restrict__ lse, const Geometry g,
                         const float scale, const MmaConfig mc) {
#if NAT_MM_MMA_DEVICE_CODE
  using M = typename MmaElement<T>::type;
  constexpr int D = KD * 16;
  for_each_mma_tile<T, D>(key, value, query, nullptr, rpb, g, mc, [&](const WarpTile<M>& w) {
    const MmaSmem<M>& sm = w.sm;
    const LaneQuery& lq = w.lq;
    warp_scores<M, KD>(w.queries, w.keys, mc, sm.s_w);
    __syncwarp();
    // softmax over each query's window into the zeroed weight block
    const bool with_bias = rpb != nullptr;
    float mx = neg_inf<float>();
    for_lane_window(lq, sm.s_w, mc.s_ld, with_bias, sm.bias, g, mc, scale,
                    [&](int, int, float s) { mx = fmaxf(mx, s); });
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    float l = 0.f;
    M* prow = sm.p_w + lq.r * mc.p_ld;
    for_lane_window(lq, sm.s_w, mc.s_ld, with_bias, sm.bias, g, mc, scale,
                    [&](int, int pos, float s) {
                      const float p = __expf(s - mx);
                      l += p;
                      prow[pos] = Convert<M>::from(p);
                    });
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    if (lq.half == 0) sm.row_w[lq.r] = 1.f / l;
    if (lq.half == 0 && lq.active) lse[lq.index] = mx + logf(l);
    __syncwarp();
    warp_mix<M, KD>(sm.p_w, w.values, mc, sm.s_w);  // the logits are no longer read
    __syncwarp();
    warp_store_rows<T, D>(out, sm.s_w, sm.row_w, w.warp, w.lane, g, mc, w.t);
  });
#endif
}

// ------------------------------------------------------------------ backward, query side
// p = exp(scale q.k + rpb - lse), ds = p (grad_out.v - delta) into the float32 maps (read by
// the key side and the rpb gradient), and grad_q = scale * ds . K with ds rounded to the
// input dtype for the tensor cores.
template <typename T, int KD>
__global__ void __launch_bounds__(kMmaWarps * 32)
    fused_bwd_mma_kernel(const T* __restrict__ query, const T* __restrict__ key,
                         const T* __restrict__ value, const T* __restrict__ grad_out,
                         const T* __restrict__ out, const T* __restrict__ rpb,
                         const float* __restrict__ lse, const float* __restrict__ grad_lse,
                         float* __restrict__ p_map, float* __restrict__ ds_map,
                         T* __restrict__ grad_q, const Geometry g, const float scale,
                         const MmaConfig mc) {
#if NAT_MM_MMA_DEVICE_CODE
  using M = typename MmaElement<T>::type;
  constexpr int D = KD * 16;
  for_each_mma_tile<T, D>(key, value, query, grad_out, rpb, g, mc, [&](const WarpTile<M>& w) {
    const MmaSmem<M>& sm = w.sm;
    const LaneQuery& lq = w.lq;
    warp_scores<M, KD>(w.queries, w.keys, mc, sm.s_w);
    warp_scores<M, KD>(w.grads, w.values, mc, sm.d_w);
    // delta = grad_out . out of the lane pair's query (each lane half of the channels),
    // less lse's gradient where given
    const M* grow = w.grads + lq.r * mc.stride;
    const M* orow = reinterpret_cast<const M*>(out) + lq.index * D;
    float delta = 0.f;
    for (int d = lq.half; d < D; d += 2) delta += Convert<M>::to(grow[d]) * Convert<M>::to(orow[d]);
    delta += __shfl_xor_sync(0xffffffffu, delta, 1);
    if (grad_lse != nullptr) delta -= grad_lse[lq.index];  // ds then carries p * grad_lse
    const float lse_q = lse[lq.index];
    __syncwarp();
    float* p_row = p_map + lq.index * g.window;
    float* ds_row = ds_map + lq.index * g.window;
    const float* dp_row = sm.d_w + lq.r * mc.s_ld;
    M* w_row = sm.p_w + lq.r * mc.p_ld;
    for_lane_window(lq, sm.s_w, mc.s_ld, rpb != nullptr, sm.bias, g, mc, scale,
                    [&](int e, int pos, float s) {
                      const float p = __expf(s - lse_q);
                      const float ds = p * (dp_row[pos] - delta);
                      if (lq.active) {
                        p_row[e] = p;
                        ds_row[e] = ds;
                      }
                      w_row[pos] = Convert<M>::from(ds);
                    });
    if (lq.half == 0) sm.row_w[lq.r] = scale;
    __syncwarp();
    warp_mix<M, KD>(sm.p_w, w.keys, mc, sm.s_w);
    __syncwarp();
    warp_store_rows<T, D>(grad_q, sm.s_w, sm.row_w, w.warp, w.lane, g, mc, w.t);
  });
#endif
}

// ------------------------------------------------------------------ backward, key side
// Fills this lane's half of its key's weight row with map entries: for every query that
// sees the key, at that query's slot in the warp's query range (starting row_lo halo rows
// in). The other slots stay as they are (zero, or the same entries of the other map).
template <typename M>
__device__ __forceinline__ void gather_key_weights(const float* map, M* w_row, int64_t sub_h,
                                                   int64_t sub_w, int half, int row_lo,
                                                   const Geometry& g, const MmaConfig& mc,
                                                   const Tile& t) {
  for_each_query_of_key(sub_h, sub_w, t, g, half, 2, [&](int64_t entry, int64_t qh,
                                                          int64_t qw) {
    w_row[(qh - t.k0h - row_lo) * mc.pitch + qw - t.k0w] = Convert<M>::from(map[entry]);
  });
}

// grad_k = scale * dS^T . Q and grad_v = P^T . dO for a tile of keys; the lanes 2r and 2r+1
// of a warp gather the weights of its key r (a clamped duplicate past the tile's edge,
// which is not stored). The weights are rounded to the input dtype for the tensor cores.
template <typename T, int KD>
__global__ void __launch_bounds__(kMmaWarps * 32)
    fused_bwd_keys_mma_kernel(const T* __restrict__ query, const T* __restrict__ grad_out,
                              const float* __restrict__ p_map, const float* __restrict__ ds_map,
                              T* __restrict__ grad_k, T* __restrict__ grad_v, const Geometry g,
                              const float scale, const MmaConfig mc) {
#if NAT_MM_MMA_DEVICE_CODE
  using M = typename MmaElement<T>::type;
  constexpr int D = KD * 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int r = lane >> 1, half = lane & 1;
  const MmaSmem<M> sm = mma_smem<M>(smem_raw, mc, warp);  // keys <- queries, values <- grad_out
  M* w_row = sm.p_w + r * mc.p_ld;
  walk_tiles(g, mc.tile, [&](const Tile& t) {
    stage_mma_halo<M, D>(reinterpret_cast<const M*>(query), reinterpret_cast<const M*>(grad_out),
                         sm.keys, sm.values, g, mc, t);
    zero_weights(sm, mc);
  }, [&](const Tile& t) {
    const int row_lo = static_cast<int>(
        mma_key_row_lo(warp, t.s0h, t.s1h, t.len_h, g.kh, t.k0h, t.nh, mc.rows));
    const int64_t first = int64_t(row_lo) * mc.pitch * mc.stride;
    const int slot = warp * 16 + r;
    const int64_t sub_h = min64(t.s0h + slot / kMmaTile, t.s1h);
    const int64_t sub_w = min64(t.s0w + slot % kMmaTile, t.s1w);
    // dst rows = factor * (weights from map) . src rows
    auto gradient = [&](const float* map, const M* src, float factor, T* dst) {
      gather_key_weights(map, w_row, sub_h, sub_w, half, row_lo, g, mc, t);
      if (half == 0) sm.row_w[r] = factor;
      __syncwarp();
      warp_mix<M, KD>(sm.p_w, src, mc, sm.s_w);
      __syncwarp();
      warp_store_rows<T, D>(dst, sm.s_w, sm.row_w, warp, lane, g, mc, t);
    };
    gradient(ds_map, sm.keys + first, scale, grad_k);
    __syncwarp();  // the weights, the rows and their factors are read
    gradient(p_map, sm.values + first, 1.f, grad_v);  // p fills the same slots as ds
  });
#endif
}

// Plans and launches kernel<T, head_dim / 16>(args..., g, scale, mc) for head dims
// 16/32/64/128 on sm_80+ with 16-byte aligned tensors; false where it does not apply.
template <typename T, template <typename, int> class Kernel, typename... Args>
bool launch_mma(MmaPass pass, const Geometry& g, double scale, int device,
                cudaStream_t stream, Args... args) {
  const DeviceLimits lim = device_limits(device);
  MmaConfig mc;
  if (lim.major < 8 || !plan_mma(g, lim.smem_optin, pass, mc)) return false;
  auto launch = [&](auto kernel) {
    // The body exists only in code for compute capability >= 8.0: a build whose PTX targets
    // an older virtual arch (JIT-compiled for this device) has an empty kernel.
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    if (attr.ptxVersion < 80) return false;
    if (mc.smem_bytes > lim.smem_default) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(mc.smem_bytes)));
    }
    const int64_t cap = int64_t(1) << 20;
    const unsigned int grid =
        static_cast<unsigned int>(mc.tile.total_tiles < cap ? mc.tile.total_tiles : cap);
    launch_kernel(kernel, grid, kMmaWarps * 32, mc.smem_bytes, stream, args..., g,
                  static_cast<float>(scale), mc);
    return true;
  };
  switch (g.dim) {
    case 16:
      return launch(Kernel<T, 1>::get());
    case 32:
      return launch(Kernel<T, 2>::get());
    case 64:
      return launch(Kernel<T, 4>::get());
    case 128:
      return launch(Kernel<T, 8>::get());
    default:
      return false;
  }
}

template <typename T, int KD>
struct ForwardMma {
  static auto get() { return fused_fwd_mma_kernel<T, KD>; }
};
template <typename T, int KD>
struct BackwardMma {
  static auto get() { return fused_bwd_mma_kernel<T, KD>; }
};
template <typename T, int KD>
struct BackwardKeysMma {
  static auto get() { return fused_bwd_keys_mma_kernel<T, KD>; }
};

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Calls f(T{}) for float16/bfloat16 when the tensor-core kernels are enabled and every
// tensor is 16-byte aligned; false otherwise.
template <typename F>
bool with_mma_type(at::ScalarType type, std::initializer_list<at::Tensor> tensors, F&& f) {
  if (!tensor_cores_enabled() || force_simple()) return false;
  for (const at::Tensor& t : tensors) {
    if (!aligned16(t)) return false;
  }
  switch (type) {
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      return false;
  }
}

bool fused_forward_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse,
                       const Geometry& g, double scale, cudaStream_t stream) {
  return with_mma_type(q.scalar_type(), {q, k, v, out}, [&](auto type) {
    using T = decltype(type);
    return launch_mma<T, ForwardMma>(
        MmaPass::kForward, g, scale, q.device().index(), stream, q.const_data_ptr<T>(),
        k.const_data_ptr<T>(), v.const_data_ptr<T>(),
        rpb.defined() ? rpb.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>(),
        lse.mutable_data_ptr<float>());
  });
}

bool backward_query_side_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& go, const at::Tensor& o, const at::Tensor& rpb,
                             const at::Tensor& lse, const at::Tensor& grad_lse,
                             const at::Tensor& p, const at::Tensor& ds, const at::Tensor& grad_q,
                             const Geometry& g, double scale, cudaStream_t stream) {
  return with_mma_type(q.scalar_type(), {q, k, v, go, o, grad_q}, [&](auto type) {
    using T = decltype(type);
    return launch_mma<T, BackwardMma>(
        MmaPass::kQuerySide, g, scale, q.device().index(), stream, q.const_data_ptr<T>(),
        k.const_data_ptr<T>(), v.const_data_ptr<T>(), go.const_data_ptr<T>(), o.const_data_ptr<T>(),
        rpb.defined() ? rpb.const_data_ptr<T>() : nullptr, lse.const_data_ptr<float>(),
        grad_lse.defined() ? grad_lse.const_data_ptr<float>() : nullptr,
        p.mutable_data_ptr<float>(), ds.mutable_data_ptr<float>(), grad_q.mutable_data_ptr<T>());
  });
}

bool backward_key_side_mma(const at::Tensor& q, const at::Tensor& go, const at::Tensor& p,
                           const at::Tensor& ds, const at::Tensor& grad_k,
                           const at::Tensor& grad_v, const Geometry& g, double scale,
                           cudaStream_t stream) {
  return with_mma_type(q.scalar_type(), {q, go, grad_k, grad_v}, [&](auto type) {
    using T = decltype(type);
    return launch_mma<T, BackwardKeysMma>(
        MmaPass::kKeySide, g, scale, q.device().index(), stream, q.const_data_ptr<T>(),
        go.const_data_ptr<T>(), p.const_data_ptr<float>(), ds.const_data_ptr<float>(),
        grad_k.mutable_data_ptr<T>(), grad_v.mutable_data_ptr<T>());
  });
}

}  // namespace cuda_detail
}  // namespace nat_mm
