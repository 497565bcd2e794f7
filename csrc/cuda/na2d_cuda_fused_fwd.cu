// Fused neighborhood attention forward on CUDA: out = softmax(scale * q k^T + rpb) v over
// each query's window, and lse = log-sum-exp of each query's logits (float32; float64 for
// float64 input).
//
// Three kernels, picked per call:
//  * tensor cores (float16/bfloat16, sm_80+, head_dim 16/32/64/128, fits shared memory):
//    na2d_cuda_fused_mma.cu; opt-in (NAT_MM_CUDA_TENSOR_CORES=1) until verified on a GPU.
//  * tiled (float16/bfloat16/float32, head_dim <= 256, halo fits shared memory): one block
//    per tile of queries of one (batch, head) and one dilation residue class. The block
//    loads the keys and values of the tile's halo (tile + kernel - 1 per axis, on the
//    dilation sub-grid) into shared memory once, with coalesced loads; then G threads per
//    query split head_dim, reduce each logit with warp shuffles, and run an online softmax
//    in registers: no attention map in memory, one pass over the window.
//  * simple (everything else, and NAT_MM_CUDA_FORCE_SIMPLE=1): logits in float32 via the qk
//    kernel, a warp-per-query softmax that also writes lse, then the av kernel.
#include "na2d_cuda_common.cuh"
#include "na2d_cuda_tile.cuh"
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
  for_each_warp_index(rows, [&](int64_t row) {
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
  });
}

void fused_forward_simple(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse,
                          const Geometry& g, double scale, cudaStream_t stream) {
  at::Tensor probs = at::empty({g.batch, g.heads, g.height, g.width, g.window},
                               q.options().dtype(lse.scalar_type()));
  launch_qk(q, k, rpb, probs, g, scale, stream);
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "na2d_fused_softmax_cuda", [&] {
    launch_kernel(softmax_lse_kernel<scalar_t>, blocks_for(g.queries * 32), kThreads, 0, stream,
        probs.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), g.queries,
        g.window);
  });
  launch_av(probs, v, out, g, 1.0, stream);
}

// ------------------------------------------------------------------ tiled path
// G threads per query share head_dim; each holds DPT channels (d = lane + u*G).
template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads)
    fused_fwd_tiled_kernel(const T* __restrict__ query, const T* __restrict__ key,
                           const T* __restrict__ value, const T* __restrict__ rpb,
                           T* __restrict__ out, float* __restrict__ lse, const Geometry g,
                           const float scale, const TileConfig tc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSmem<T> sm = tile_smem<T>(smem_raw, tc);
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x - group * G;
  const int64_t D = g.dim;

  for_each_tile(key, value, rpb, sm, g, tc, group, [&](const TileQuery& tq, const Tile&) {
    const T* qp = query + tq.index * D;
    float qreg[DPT], acc[DPT];
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
      const int64_t d = lane + u * G;
      qreg[u] = d < D ? static_cast<float>(qp[d]) * scale : 0.f;
      acc[u] = 0.f;
    }
    // Online softmax over the window: running max, sum and rescaled accumulator.
    float mx = neg_inf<float>(), l = 0.f;
    for (int64_t m = 0; m < g.kh; ++m) {
      const int64_t key_row = tq.key_row0 + m * tc.halo_w;
      const float* brow = sm.bias + tq.bias0 + m * g.bias_w;
      for (int64_t n = 0; n < g.kw; ++n) {
        const T* kp = sm.keys + (key_row + n) * tc.stride;
        float part = 0.f;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          const int64_t d = lane + u * G;
          if (d < D) part += qreg[u] * static_cast<float>(kp[d]);
        }
        part = group_sum<G>(part);
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
        const T* vp = sm.values + (key_row + n) * tc.stride;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          const int64_t d = lane + u * G;
          if (d < D) acc[u] += p * static_cast<float>(vp[d]);
        }
      }
    }
    if (tq.active) {
      const float inv = 1.f / l;
      T* op = out + tq.index * D;
#pragma unroll
      for (int u = 0; u < DPT; ++u) {
        const int64_t d = lane + u * G;
        if (d < D) op[d] = static_cast<T>(acc[u] * inv);
      }
      if (lane == 0) lse[tq.index] = mx + logf(l);
    }
  });
}

template <typename T>
bool fused_forward_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse,
                         const Geometry& g, double scale, cudaStream_t stream) {
  return with_group_shape(g.dim, [&](auto group, auto per_thread) {
    constexpr int G = decltype(group)::value, DPT = decltype(per_thread)::value;
    return launch_tiled<T, G>(fused_fwd_tiled_kernel<T, G, DPT>, false, g, static_cast<float>(scale),
                              q.device().index(), stream, q.const_data_ptr<T>(),
                              k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                              rpb.defined() ? rpb.const_data_ptr<T>() : nullptr,
                              out.mutable_data_ptr<T>(), lse.mutable_data_ptr<float>());
  });
}

}  // namespace cuda_detail

using namespace cuda_detail;

std::tuple<at::Tensor, at::Tensor> na2d_fused_cuda(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value,
                                                   const std::optional<at::Tensor>& rpb,
                                                   at::IntArrayRef kernel_size,
                                                   at::IntArrayRef dilation, double scale) {
  check_fused_args(query, key, value, rpb, kernel_size, dilation);
  c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  const at::Tensor bias = is_given(rpb) ? rpb->contiguous() : at::Tensor();
  const Geometry g = make_geometry(q, q.size(4), kernel_size, dilation);
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(v.sizes(), v.options());
  at::Tensor lse = at::empty({g.batch, g.heads, g.height, g.width}, q.options().dtype(lse_type));
  if (g.queries == 0) return {out, lse};
  const cudaStream_t stream = current_stream(q);
  const bool done = g.dim > 0 && (fused_forward_mma(q, k, v, bias, out, lse, g, scale, stream) ||
                                  with_tiled_type(q.scalar_type(), [&](auto type) {
                                    return fused_forward_tiled<decltype(type)>(
                                        q, k, v, bias, out, lse, g, scale, stream);
                                  }));
  if (!done) fused_forward_simple(q, k, v, bias, out, lse, g, scale, stream);
  return {out, lse};
}

}  // namespace nat_mm
