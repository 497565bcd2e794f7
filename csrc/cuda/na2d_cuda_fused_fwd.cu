// Fused neighborhood attention forward on CUDA: out = softmax(scale * q k^T + rpb) v over
// each query's window, and lse = log-sum-exp of each query's logits (float32; float64 for
// float64 input).
//
// Two kernels, picked per call:
//  * tiled (float16/bfloat16/float32, head_dim <= 256, halo fits shared memory): one block
//    per tile of queries of one (batch, head) and one dilation residue class. The block
//    loads the keys and values of the tile's halo (tile + kernel - 1 per axis, on the
//    dilation sub-grid) into shared memory once, with coalesced loads; then G threads per
//    query split head_dim, reduce each logit with warp shuffles, and run an online softmax
//    in registers: no attention map in memory, one pass over the window.
//  * simple (everything else, and NAT_MM_CUDA_FORCE_SIMPLE=1): logits in float32 via the qk
//    kernel, a warp-per-query softmax that also writes lse, then the av kernel.
#include "na2d_cuda_common.cuh"
#include "na2d_kernels.h"

namespace nat_mm {
namespace cuda_detail {

template <typename T>
using acc_t = at::opmath_type<T>;

// ------------------------------------------------------------------ simple path
// In place: logits -> probabilities exp(x - lse); one warp per row of `len` logits.
template <typename AccT>
__global__ void __launch_bounds__(kThreads)
    softmax_lse_kernel(AccT* __restrict__ x, AccT* __restrict__ lse, const int64_t rows,
                       const int64_t len) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x / 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; row < rows;
       row += step) {
    AccT* p = x + row * len;
    AccT mx = neg_inf<AccT>();
    for (int64_t c = lane; c < len; c += 32) mx = p[c] > mx ? p[c] : mx;
    mx = warp_max(mx);
    AccT sum = 0;
    for (int64_t c = lane; c < len; c += 32) sum += exp_acc(p[c] - mx);
    sum = warp_sum(sum);
    const AccT l = mx + log_acc(sum);
    for (int64_t c = lane; c < len; c += 32) p[c] = exp_acc(p[c] - l);
    if (lane == 0) lse[row] = l;
  }
}

void fused_forward_simple(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse,
                          const Geometry& g, double scale, cudaStream_t stream) {
  at::Tensor probs = at::empty({g.batch, g.heads, g.height, g.width, g.window},
                               q.options().dtype(lse.scalar_type()));
  launch_qk(q, k, rpb, probs, g, scale, stream);
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "na2d_fused_softmax_cuda", [&] {
    softmax_lse_kernel<scalar_t><<<blocks_for(g.queries * 32), kThreads, 0, stream>>>(
        probs.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), g.queries,
        g.window);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_av(probs, v, out, g, 1.0, stream);
}

// ------------------------------------------------------------------ tiled path
struct TileConfig {
  int th, tw;          // queries per tile (sub-grid rows, columns)
  int halo_h, halo_w;  // largest halo (key rows, columns) a tile can need
  int stride;          // elements between two keys' rows in shared memory (>= dim)
  int64_t tiles_h, tiles_w;  // tiles per residue class along each axis
  int64_t total_tiles;
  int64_t bias_offset;  // byte offset of the rpb copy in shared memory
  int64_t smem_bytes;
};

// G threads per query share head_dim; each holds DPT channels (d = lane + t*G).
template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads)
    fused_fwd_tiled_kernel(const T* __restrict__ query, const T* __restrict__ key,
                           const T* __restrict__ value, const T* __restrict__ rpb,
                           T* __restrict__ out, float* __restrict__ lse, const Geometry g,
                           const float scale, const TileConfig tc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + static_cast<int64_t>(tc.halo_h) * tc.halo_w * tc.stride;
  float* bias_s = reinterpret_cast<float*>(smem_raw + tc.bias_offset);
  const int tid = threadIdx.x;
  const int group = tid / G;
  const int lane = tid - group * G;
  const int qr = group / tc.tw;
  const int qc = group - qr * tc.tw;
  const int64_t D = g.dim;
  const int64_t bins = g.bias_h * g.bias_w;

  for (int64_t tile = blockIdx.x; tile < tc.total_tiles; tile += gridDim.x) {
    int64_t t = tile;
    const int64_t tcol = t % tc.tiles_w;
    t /= tc.tiles_w;
    const int64_t trow = t % tc.tiles_h;
    t /= tc.tiles_h;
    const int64_t rj = t % g.dw;
    t /= g.dw;
    const int64_t ri = t % g.dh;
    const int64_t bh = t / g.dh;
    const int64_t len_h = subgrid_length(g.height, g.dh, ri);
    const int64_t len_w = subgrid_length(g.width, g.dw, rj);
    const int64_t s0h = trow * tc.th, s0w = tcol * tc.tw;
    if (s0h >= len_h || s0w >= len_w) continue;  // uniform over the block
    const int64_t s1h = (s0h + tc.th < len_h ? s0h + tc.th : len_h) - 1;
    const int64_t s1w = (s0w + tc.tw < len_w ? s0w + tc.tw : len_w) - 1;
    // Key range of the tile on the sub-grid: window starts are monotone in the query.
    const int64_t k0h = axis_window(s0h * g.dh + ri, g.height, g.kh, g.dh).start;
    const int64_t nh = axis_window(s1h * g.dh + ri, g.height, g.kh, g.dh).start + g.kh - k0h;
    const int64_t k0w = axis_window(s0w * g.dw + rj, g.width, g.kw, g.dw).start;
    const int64_t nw = axis_window(s1w * g.dw + rj, g.width, g.kw, g.dw).start + g.kw - k0w;

    __syncthreads();  // the previous tile's readers are done with shared memory
    const int64_t plane = bh * g.height * g.width;
    const int64_t count = nh * nw * D;
    for (int64_t e = tid; e < count; e += blockDim.x) {
      const int64_t kk = div_fast(e, D);
      const int64_t d = e - kk * D;
      const int64_t hr = div_fast(kk, nw);
      const int64_t hc = kk - hr * nw;
      const int64_t src =
          (plane + ((k0h + hr) * g.dh + ri) * g.width + (k0w + hc) * g.dw + rj) * D + d;
      const int64_t dst = (hr * tc.halo_w + hc) * tc.stride + d;
      ks[dst] = key[src];
      vs[dst] = value[src];
    }
    if (rpb != nullptr) {
      const int64_t h = bh % g.heads;
      for (int64_t e = tid; e < bins; e += blockDim.x) {
        bias_s[e] = static_cast<float>(rpb[h * bins + e]);
      }
    }
    __syncthreads();

    // This thread's query; threads past the tile's edge compute a clamped duplicate so that
    // every lane takes part in the shuffles, and write nothing.
    const bool active = s0h + qr <= s1h && s0w + qc <= s1w;
    const int64_t sh = s0h + qr <= s1h ? s0h + qr : s1h;
    const int64_t sw = s0w + qc <= s1w ? s0w + qc : s1w;
    const int64_t qi = sh * g.dh + ri, qj = sw * g.dw + rj;
    const AxisWindow wr = axis_window(qi, g.height, g.kh, g.dh);
    const AxisWindow wc = axis_window(qj, g.width, g.kw, g.dw);
    const int64_t q_index = plane + qi * g.width + qj;
    const T* qp = query + q_index * D;

    float qreg[DPT], acc[DPT];
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
      const int64_t d = lane + u * G;
      qreg[u] = d < D ? static_cast<float>(qp[d]) * scale : 0.f;
      acc[u] = 0.f;
    }
    float mx = neg_inf<float>(), l = 0.f;
    const int64_t lr0 = wr.start - k0h, lc0 = wc.start - k0w;
    const int64_t br0 = wr.bias(0, g.kh), bc0 = wc.bias(0, g.kw);
    for (int64_t m = 0; m < g.kh; ++m) {
      const int64_t key_row = (lr0 + m) * tc.halo_w + lc0;
      const float* brow = bias_s + (br0 + m) * g.bias_w + bc0;
      for (int64_t n = 0; n < g.kw; ++n) {
        const T* kp = ks + (key_row + n) * tc.stride;
        float part = 0.f;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          const int64_t d = lane + u * G;
          if (d < D) part += qreg[u] * static_cast<float>(kp[d]);
        }
#pragma unroll
        for (int off = G / 2; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        const float s = rpb != nullptr ? part + brow[n] : part;
        if (s > mx) {
          const float c = __expf(mx - s);
          l *= c;
#pragma unroll
          for (int u = 0; u < DPT; ++u) acc[u] *= c;
          mx = s;
        }
        const float p = __expf(s - mx);
        l += p;
        const T* vp = vs + (key_row + n) * tc.stride;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          const int64_t d = lane + u * G;
          if (d < D) acc[u] += p * static_cast<float>(vp[d]);
        }
      }
    }
    if (active) {
      const float inv = 1.f / l;
      T* op = out + q_index * D;
#pragma unroll
      for (int u = 0; u < DPT; ++u) {
        const int64_t d = lane + u * G;
        if (d < D) op[d] = static_cast<T>(acc[u] * inv);
      }
      if (lane == 0) lse[q_index] = mx + logf(l);
    }
  }
}

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

// Tile shape for G threads per query and 256 threads: 8 columns (one warp spans
// 32/G adjacent queries of a row) and 256/(8G) rows; halved while shared memory is short.
inline bool plan_tiles(const Geometry& g, int G, int elem_bytes, int64_t smem_limit,
                       TileConfig& tc) {
  const int tw = 8;
  const int64_t sub_h = (g.height + g.dh - 1) / g.dh;  // longest sub-grid (residue 0)
  const int64_t sub_w = (g.width + g.dw - 1) / g.dw;
  for (int th = kThreads / (tw * G); th >= 1; th /= 2) {
    if ((th * tw * G) % 32 != 0) break;
    const int64_t halo_h = std::min<int64_t>(th + g.kh - 1, sub_h);
    const int64_t halo_w = std::min<int64_t>(tw + g.kw - 1, sub_w);
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

template <typename T, int G, int DPT>
bool try_launch_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse,
                      const Geometry& g, double scale, cudaStream_t stream) {
  const DeviceLimits lim = device_limits(q.device().index());
  TileConfig tc;
  if (!plan_tiles(g, G, sizeof(T), lim.smem_optin, tc)) return false;
  auto kernel = fused_fwd_tiled_kernel<T, G, DPT>;
  if (tc.smem_bytes > lim.smem_default) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(tc.smem_bytes)));
  }
  const int threads = tc.th * tc.tw * G;
  const int64_t cap = int64_t(1) << 20;
  const unsigned int grid =
      static_cast<unsigned int>(tc.total_tiles < cap ? tc.total_tiles : cap);
  kernel<<<grid, threads, tc.smem_bytes, stream>>>(
      q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
      rpb.defined() ? rpb.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>(),
      lse.mutable_data_ptr<float>(), g, static_cast<float>(scale), tc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
bool fused_forward_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse,
                         const Geometry& g, double scale, cudaStream_t stream) {
  if (g.dim <= 16) return try_launch_tiled<T, 4, 4>(q, k, v, rpb, out, lse, g, scale, stream);
  if (g.dim <= 32) return try_launch_tiled<T, 4, 8>(q, k, v, rpb, out, lse, g, scale, stream);
  if (g.dim <= 64) return try_launch_tiled<T, 4, 16>(q, k, v, rpb, out, lse, g, scale, stream);
  if (g.dim <= 128) return try_launch_tiled<T, 8, 16>(q, k, v, rpb, out, lse, g, scale, stream);
  if (g.dim <= 256) return try_launch_tiled<T, 16, 16>(q, k, v, rpb, out, lse, g, scale, stream);
  return false;
}

}  // namespace cuda_detail

using namespace cuda_detail;

std::tuple<at::Tensor, at::Tensor> na2d_fused_cuda(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value,
                                                   const std::optional<at::Tensor>& rpb,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef dilation, double scale) {
  check_window_args(kernel_size, dilation);
  check_cuda_5d(query, "query");
  check_cuda_5d(key, "key");
  check_cuda_5d(value, "value");
  check_same_device_dtype(query, "query", key, "key");
  check_same_device_dtype(query, "query", value, "value");
  TORCH_CHECK(key.sizes() == query.sizes() && value.sizes() == query.sizes(),
              "nat_mm: query, key and value must have one shape, got ", query.sizes(), ", ",
              key.sizes(), ", ", value.sizes());
  check_map_size(query, kernel_size, dilation);
  check_rpb(rpb, query, kernel_size);
  c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor bias = has_rpb(rpb) ? rpb->contiguous() : at::Tensor();
  const Geometry g = make_geometry(q, q.size(4), kernel_size, dilation);
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(v.sizes(), v.options());
  at::Tensor lse = at::empty({g.batch, g.heads, g.height, g.width}, q.options().dtype(lse_type));
  if (g.queries == 0) return {out, lse};
  const cudaStream_t stream = current_stream(q);
  bool done = false;
  if (!force_simple() && g.dim > 0) {
    switch (q.scalar_type()) {
      case at::kHalf:
        done = fused_forward_tiled<c10::Half>(q, k, v, bias, out, lse, g, scale, stream);
        break;
      case at::kBFloat16:
        done = fused_forward_tiled<c10::BFloat16>(q, k, v, bias, out, lse, g, scale, stream);
        break;
      case at::kFloat:
        done = fused_forward_tiled<float>(q, k, v, bias, out, lse, g, scale, stream);
        break;
      default:
        break;
    }
  }
  if (!done) fused_forward_simple(q, k, v, bias, out, lse, g, scale, stream);
  return {out, lse};
}

}  // namespace nat_mm
