// Fused neighborhood attention backward on CUDA. Given grad_out, q, k, v, rpb, out and the
// forward's lse, it recomputes the probabilities p = exp(scale * q.k + rpb - lse) and
//   ds      = p * (grad_out . v_nbr - delta),  delta = grad_out . out     (per query)
//   grad_q  = scale * sum_n ds * k_nbr
//   grad_k  = scale * sum over the queries that see the key of ds * q     (inverse gather)
//   grad_v  =         sum over the queries that see the key of p * grad_out
//   grad_rpb = ds binned by relative position (deterministic two-pass reduction)
// p and ds are kept in float32 (float64 for float64 input) maps [B, heads, H, W, kh*kw];
// grad_k and grad_v are gathered per key (no atomics), so every output is deterministic.
//
// The query-side pass has two kernels:
//  * tiled (float16/bfloat16/float32, head_dim <= 256, halo fits shared memory): the key
//    and value halo of a query tile in shared memory, G threads per query, delta, p, ds
//    and grad_q in one pass;
//  * simple: a warp-per-query delta kernel, a thread-per-(query, neighbor) kernel for p and
//    ds, then grad_q through the av kernel.
#include "na2d_cuda_common.cuh"
#include "na2d_kernels.h"

namespace nat_mm {
namespace cuda_detail {

template <typename T>
using acc_t = at::opmath_type<T>;

// ------------------------------------------------------------------ simple path
// delta[row] = sum_d a[row, d] * b[row, d]; one warp per row.
template <typename T, typename AccT>
__global__ void __launch_bounds__(kThreads)
    rowdot_kernel(const T* __restrict__ a, const T* __restrict__ b, AccT* __restrict__ out,
                  const int64_t rows, const int64_t dim) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x / 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; row < rows;
       row += step) {
    AccT acc = 0;
    for (int64_t d = lane; d < dim; d += 32) {
      acc += static_cast<AccT>(a[row * dim + d]) * static_cast<AccT>(b[row * dim + d]);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[row] = acc;
  }
}

// One thread per (query, neighbor): p and ds.
template <typename T, typename AccT>
__global__ void __launch_bounds__(kThreads)
    bwd_scores_kernel(const T* __restrict__ query, const T* __restrict__ key,
                      const T* __restrict__ value, const T* __restrict__ grad_out,
                      const T* __restrict__ rpb, const AccT* __restrict__ lse,
                      const AccT* __restrict__ delta, AccT* __restrict__ p_out,
                      AccT* __restrict__ ds_out, const Geometry g, const AccT scale) {
  const int64_t total = g.queries * g.window;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t q_index = div_fast(idx, g.window);
    const int64_t nb = idx - q_index * g.window;
    const int64_t m = div_fast(nb, g.kw);
    const int64_t n = nb - m * g.kw;
    const int64_t row = div_fast(q_index, g.width);
    const int64_t j = q_index - row * g.width;
    const int64_t bh = div_fast(row, g.height);
    const int64_t i = row - bh * g.height;
    const AxisWindow wr = axis_window(i, g.height, g.kh, g.dh);
    const AxisWindow wc = axis_window(j, g.width, g.kw, g.dw);
    const int64_t k_off = ((bh * g.height + wr.key(m)) * g.width + wc.key(n)) * g.dim;
    const T* qp = query + q_index * g.dim;
    const T* gp = grad_out + q_index * g.dim;
    const T* kp = key + k_off;
    const T* vp = value + k_off;
    AccT s = 0, dp = 0;
    for (int64_t d = 0; d < g.dim; ++d) {
      s += static_cast<AccT>(qp[d]) * static_cast<AccT>(kp[d]);
      dp += static_cast<AccT>(gp[d]) * static_cast<AccT>(vp[d]);
    }
    s *= scale;
    if (rpb != nullptr) {
      const int64_t h = bh - div_fast(bh, g.heads) * g.heads;
      s += static_cast<AccT>(
          rpb[(h * g.bias_h + wr.bias(m, g.kh)) * g.bias_w + wc.bias(n, g.kw)]);
    }
    const AccT p = exp_acc(s - lse[q_index]);
    p_out[idx] = p;
    ds_out[idx] = p * (dp - delta[q_index]);
  }
}

void query_side_simple(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& go, const at::Tensor& o, const at::Tensor& rpb,
                       const at::Tensor& lse, const at::Tensor& p, const at::Tensor& ds,
                       const at::Tensor& grad_q, const Geometry& g, double scale,
                       cudaStream_t stream) {
  at::Tensor delta = at::empty({g.queries}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "na2d_fused_bwd_cuda", [&] {
    using AccT = acc_t<scalar_t>;
    rowdot_kernel<scalar_t, AccT><<<blocks_for(g.queries * 32), kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        delta.mutable_data_ptr<AccT>(), g.queries, g.dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_scores_kernel<scalar_t, AccT><<<blocks_for(g.queries * g.window), kThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        go.const_data_ptr<scalar_t>(), rpb.defined() ? rpb.const_data_ptr<scalar_t>() : nullptr,
        lse.const_data_ptr<AccT>(), delta.const_data_ptr<AccT>(), p.mutable_data_ptr<AccT>(),
        ds.mutable_data_ptr<AccT>(), g, static_cast<AccT>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_av(ds, k, grad_q, g, scale, stream);
}

// ------------------------------------------------------------------ tiled path
struct BwdTileConfig {
  int th, tw, halo_h, halo_w, stride;
  int64_t tiles_h, tiles_w, total_tiles, bias_offset, smem_bytes;
};

template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads)
    fused_bwd_tiled_kernel(const T* __restrict__ query, const T* __restrict__ key,
                           const T* __restrict__ value, const T* __restrict__ grad_out,
                           const T* __restrict__ out, const T* __restrict__ rpb,
                           const float* __restrict__ lse, float* __restrict__ p_out,
                           float* __restrict__ ds_out, T* __restrict__ grad_q, const Geometry g,
                           const float scale, const BwdTileConfig tc) {
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
    const int64_t k0h = axis_window(s0h * g.dh + ri, g.height, g.kh, g.dh).start;
    const int64_t nh = axis_window(s1h * g.dh + ri, g.height, g.kh, g.dh).start + g.kh - k0h;
    const int64_t k0w = axis_window(s0w * g.dw + rj, g.width, g.kw, g.dw).start;
    const int64_t nw = axis_window(s1w * g.dw + rj, g.width, g.kw, g.dw).start + g.kw - k0w;

    __syncthreads();
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

    const bool active = s0h + qr <= s1h && s0w + qc <= s1w;
    const int64_t sh = s0h + qr <= s1h ? s0h + qr : s1h;
    const int64_t sw = s0w + qc <= s1w ? s0w + qc : s1w;
    const int64_t qi = sh * g.dh + ri, qj = sw * g.dw + rj;
    const AxisWindow wr = axis_window(qi, g.height, g.kh, g.dh);
    const AxisWindow wc = axis_window(qj, g.width, g.kw, g.dw);
    const int64_t q_index = plane + qi * g.width + qj;

    float qreg[DPT], greg[DPT], dq[DPT];
    float delta = 0.f;
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
      const int64_t d = lane + u * G;
      const bool in = d < D;
      qreg[u] = in ? static_cast<float>(query[q_index * D + d]) * scale : 0.f;
      greg[u] = in ? static_cast<float>(grad_out[q_index * D + d]) : 0.f;
      delta += in ? greg[u] * static_cast<float>(out[q_index * D + d]) : 0.f;
      dq[u] = 0.f;
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) delta += __shfl_xor_sync(0xffffffffu, delta, off);
    const float lse_q = lse[q_index];
    float* p_row = p_out + q_index * g.window;
    float* ds_row = ds_out + q_index * g.window;

    const int64_t lr0 = wr.start - k0h, lc0 = wc.start - k0w;
    const int64_t br0 = wr.bias(0, g.kh), bc0 = wc.bias(0, g.kw);
    for (int64_t m = 0; m < g.kh; ++m) {
      const int64_t key_row = (lr0 + m) * tc.halo_w + lc0;
      const float* brow = bias_s + (br0 + m) * g.bias_w + bc0;
      for (int64_t n = 0; n < g.kw; ++n) {
        const T* kp = ks + (key_row + n) * tc.stride;
        const T* vp = vs + (key_row + n) * tc.stride;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          const int64_t d = lane + u * G;
          if (d < D) {
            s += qreg[u] * static_cast<float>(kp[d]);
            dp += greg[u] * static_cast<float>(vp[d]);
          }
        }
#pragma unroll
        for (int off = G / 2; off > 0; off >>= 1) {
          s += __shfl_xor_sync(0xffffffffu, s, off);
          dp += __shfl_xor_sync(0xffffffffu, dp, off);
        }
        if (rpb != nullptr) s += brow[n];
        const float p = __expf(s - lse_q);
        const float ds = p * (dp - delta);
        const int64_t nb = m * g.kw + n;
        if (active && lane == static_cast<int>(nb % G)) {
          p_row[nb] = p;
          ds_row[nb] = ds;
        }
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          const int64_t d = lane + u * G;
          if (d < D) dq[u] += ds * static_cast<float>(kp[d]);
        }
      }
    }
    if (active) {
#pragma unroll
      for (int u = 0; u < DPT; ++u) {
        const int64_t d = lane + u * G;
        if (d < D) grad_q[q_index * D + d] = static_cast<T>(dq[u] * scale);
      }
    }
  }
}

// Same tile planning as the forward (see na2d_cuda_fused_fwd.cu).
inline int bwd_choose_stride(int64_t dim, int elem_bytes, int G) {
  const int64_t natural_words = (dim * elem_bytes + 3) / 4;
  const int per_word = 4 / elem_bytes;
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

inline bool bwd_plan_tiles(const Geometry& g, int G, int elem_bytes, int64_t smem_limit,
                           BwdTileConfig& tc) {
  const int tw = 8;
  const int64_t sub_h = (g.height + g.dh - 1) / g.dh;
  const int64_t sub_w = (g.width + g.dw - 1) / g.dw;
  for (int th = kThreads / (tw * G); th >= 1; th /= 2) {
    if ((th * tw * G) % 32 != 0) break;
    const int64_t halo_h = std::min<int64_t>(th + g.kh - 1, sub_h);
    const int64_t halo_w = std::min<int64_t>(tw + g.kw - 1, sub_w);
    const int stride = bwd_choose_stride(g.dim, elem_bytes, G);
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
bool try_bwd_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& go, const at::Tensor& o, const at::Tensor& rpb,
                   const at::Tensor& lse, const at::Tensor& p, const at::Tensor& ds,
                   const at::Tensor& grad_q, const Geometry& g, double scale,
                   cudaStream_t stream) {
  const DeviceLimits lim = device_limits(q.device().index());
  BwdTileConfig tc;
  if (!bwd_plan_tiles(g, G, sizeof(T), lim.smem_optin, tc)) return false;
  auto kernel = fused_bwd_tiled_kernel<T, G, DPT>;
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
      go.const_data_ptr<T>(), o.const_data_ptr<T>(),
      rpb.defined() ? rpb.const_data_ptr<T>() : nullptr, lse.const_data_ptr<float>(),
      p.mutable_data_ptr<float>(), ds.mutable_data_ptr<float>(), grad_q.mutable_data_ptr<T>(), g,
      static_cast<float>(scale), tc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
bool query_side_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& go, const at::Tensor& o, const at::Tensor& rpb,
                      const at::Tensor& lse, const at::Tensor& p, const at::Tensor& ds,
                      const at::Tensor& grad_q, const Geometry& g, double scale,
                      cudaStream_t stream) {
#define NAT_MM_BWD_TRY(G, DPT) \
  return try_bwd_tiled<T, G, DPT>(q, k, v, go, o, rpb, lse, p, ds, grad_q, g, scale, stream)
  if (g.dim <= 16) NAT_MM_BWD_TRY(4, 4);
  if (g.dim <= 32) NAT_MM_BWD_TRY(4, 8);
  if (g.dim <= 64) NAT_MM_BWD_TRY(4, 16);
  if (g.dim <= 128) NAT_MM_BWD_TRY(8, 16);
  if (g.dim <= 256) NAT_MM_BWD_TRY(16, 16);
#undef NAT_MM_BWD_TRY
  return false;
}

}  // namespace cuda_detail

using namespace cuda_detail;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_fused_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& rpb, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef kernel_size, at::IntArrayRef dilation, double scale) {
  check_window_args(kernel_size, dilation);
  check_cuda_5d(query, "query");
  check_cuda_5d(key, "key");
  check_cuda_5d(value, "value");
  check_cuda_5d(grad_out, "grad_out");
  check_cuda_5d(out, "out");
  check_same_device_dtype(query, "query", key, "key");
  check_same_device_dtype(query, "query", value, "value");
  TORCH_CHECK(grad_out.device() == query.device() && out.device() == query.device() &&
                  lse.device() == query.device(),
              "nat_mm: grad_out, out and lse must be on the device of query (", query.device(),
              ")");
  TORCH_CHECK(key.sizes() == query.sizes() && value.sizes() == query.sizes() &&
                  grad_out.sizes() == query.sizes() && out.sizes() == query.sizes(),
              "nat_mm: query, key, value, out and grad_out must have one shape, got ",
              query.sizes(), ", ", key.sizes(), ", ", value.sizes(), ", ", out.sizes(), ", ",
              grad_out.sizes());
  TORCH_CHECK(lse.dim() == 4 && lse.sizes() == query.sizes().slice(0, 4),
              "nat_mm: lse must have shape [batch, heads, height, width] = ",
              query.sizes().slice(0, 4), ", got ", lse.sizes());
  TORCH_CHECK(at::isFloatingType(lse.scalar_type()), "nat_mm: lse must be floating, got ",
              lse.scalar_type());
  check_map_size(query, kernel_size, dilation);
  check_rpb(rpb, query, kernel_size);
  c10::cuda::CUDAGuard guard(query.device());
  const auto dtype = query.scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor go = grad_out.to(dtype).contiguous(), o = out.to(dtype).contiguous();
  const at::Tensor ls = lse.to(acc_type).contiguous();
  const at::Tensor bias = has_rpb(rpb) ? rpb->contiguous() : at::Tensor();
  const Geometry g = make_geometry(q, q.size(4), kernel_size, dilation);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(q.sizes(), q.options());
  at::Tensor grad_v = at::empty(q.sizes(), q.options());
  if (g.queries == 0) {
    return {grad_q, grad_k, grad_v, at::zeros({g.heads, g.bias_h, g.bias_w}, q.options())};
  }
  at::Tensor grad_rpb = at::empty({g.heads, g.bias_h, g.bias_w}, q.options());
  const cudaStream_t stream = current_stream(q);
  at::Tensor p = at::empty({g.batch, g.heads, g.height, g.width, g.window}, ls.options());
  at::Tensor ds = at::empty(p.sizes(), p.options());

  bool done = false;
  if (!force_simple() && g.dim > 0) {
    switch (dtype) {
      case at::kHalf:
        done = query_side_tiled<c10::Half>(q, k, v, go, o, bias, ls, p, ds, grad_q, g, scale,
                                           stream);
        break;
      case at::kBFloat16:
        done = query_side_tiled<c10::BFloat16>(q, k, v, go, o, bias, ls, p, ds, grad_q, g,
                                               scale, stream);
        break;
      case at::kFloat:
        done = query_side_tiled<float>(q, k, v, go, o, bias, ls, p, ds, grad_q, g, scale, stream);
        break;
      default:
        break;
    }
  }
  if (!done) query_side_simple(q, k, v, go, o, bias, ls, p, ds, grad_q, g, scale, stream);
  launch_inverse(ds, q, grad_k, scale, p, go, grad_v, 1.0, g, stream);
  launch_rpb_grad(ds, grad_rpb, g, stream);
  return {grad_q, grad_k, grad_v, grad_rpb};
}

}  // namespace nat_mm
