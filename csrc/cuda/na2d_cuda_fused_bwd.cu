// Fused neighborhood attention backward on CUDA. Given grad_out, q, k, v, rpb, out and the
// forward's lse, it recomputes the probabilities p = exp(scale * q.k + rpb - lse) and
//   ds      = p * (grad_out . v_nbr - delta),  delta = grad_out . out - grad_lse  (per query;
//             grad_lse, lse's own gradient, when given: d lse / d logits = p)
//   grad_q  = scale * sum_n ds * k_nbr
//   grad_k  = scale * sum over the queries that see the key of ds * q     (inverse gather)
//   grad_v  =         sum over the queries that see the key of p * grad_out
//   grad_rpb = ds binned by relative position (deterministic two-pass reduction)
// p and ds are kept in float32 (float64 for float64 input) maps [B, heads, H, W, kh*kw];
// grad_k and grad_v are gathered per key (no atomics), so every output is deterministic.
//
// The query-side pass has three kernels:
//  * tensor cores (float16/bfloat16, head_dim 16/32/64/128): na2d_cuda_fused_mma.cu, opt-in
//    (NAT_MM_CUDA_TENSOR_CORES=1) until verified on a GPU;
//  * tiled (float16/bfloat16/float32, head_dim <= 256, halo fits shared memory): the key
//    and value halo of a query tile in shared memory, G threads per query, delta, p, ds
//    and grad_q in one pass;
//  * simple: a warp-per-query delta kernel, a thread-per-(query, neighbor) kernel for p and
//    ds, then grad_q through the av kernel.
// The key-side pass (grad_k, grad_v) likewise:
//  * tensor cores: na2d_cuda_fused_mma.cu, opt-in with the query side's;
//  * tiled: a tile of keys with the halo of queries that see them (their q and grad_out in
//    shared memory), G threads per key; the window arithmetic runs once per (key, query)
//    pair on the sub-grid (no division), the p/ds entries come from the maps;
//  * simple: the inverse kernel, one thread per (key, channel).
#include "na2d_cuda_common.cuh"
#include "na2d_cuda_tile.cuh"
#include "na2d_kernels.h"

namespace nat_mm {
namespace cuda_detail {

template <typename T>
using acc_t = at::opmath_type<T>;

// ------------------------------------------------------------------ simple path
// delta[row] = sum_d a[row, d] * b[row, d] (- minus[row] where given); one warp per row.
template <typename T, typename AccT>
__global__ void __launch_bounds__(kThreads)
    rowdot_kernel(const T* __restrict__ a, const T* __restrict__ b,
                  const AccT* __restrict__ minus, AccT* __restrict__ out, const int64_t rows,
                  const int64_t dim) {
  const int lane = threadIdx.x & 31;
  for_each_warp_index(rows, [&](int64_t row) {
    AccT acc = 0;
    for (int64_t d = lane; d < dim; d += 32) {
      acc += static_cast<AccT>(a[row * dim + d]) * static_cast<AccT>(b[row * dim + d]);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[row] = minus != nullptr ? acc - minus[row] : acc;
  });
}

// One thread per (query, neighbor): p and ds.
template <typename T, typename AccT>
__global__ void __launch_bounds__(kThreads)
    bwd_scores_kernel(const T* __restrict__ query, const T* __restrict__ key,
                      const T* __restrict__ value, const T* __restrict__ grad_out,
                      const T* __restrict__ rpb, const AccT* __restrict__ lse,
                      const AccT* __restrict__ delta, AccT* __restrict__ p_out,
                      AccT* __restrict__ ds_out, const Geometry g, const AccT scale) {
  for_each_thread_index(g.queries * g.window, [&](int64_t idx) {
    const QueryNeighbor qn = query_neighbor(idx, g);
    const T* qp = query + qn.query * g.dim;
    const T* gp = grad_out + qn.query * g.dim;
    const T* kp = key + qn.key * g.dim;
    const T* vp = value + qn.key * g.dim;
    AccT s = 0, dp = 0;
    for (int64_t d = 0; d < g.dim; ++d) {
      s += static_cast<AccT>(qp[d]) * static_cast<AccT>(kp[d]);
      dp += static_cast<AccT>(gp[d]) * static_cast<AccT>(vp[d]);
    }
    s *= scale;
    if (rpb != nullptr) s += static_cast<AccT>(rpb[qn.bias]);
    const AccT p = exp_acc(s - lse[qn.query]);
    p_out[idx] = p;
    ds_out[idx] = p * (dp - delta[qn.query]);
  });
}

void query_side_simple(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& go, const at::Tensor& o, const at::Tensor& rpb,
                       const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& p,
                       const at::Tensor& ds, const at::Tensor& grad_q, const Geometry& g,
                       double scale, cudaStream_t stream) {
  at::Tensor delta = at::empty({g.queries}, lse.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "na2d_fused_bwd_cuda", [&] {
    using AccT = acc_t<scalar_t>;
    launch_kernel(rowdot_kernel<scalar_t, AccT>, blocks_for(g.queries * 32), kThreads, 0, stream,
        go.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
        grad_lse.defined() ? grad_lse.const_data_ptr<AccT>() : nullptr,
        delta.mutable_data_ptr<AccT>(), g.queries, g.dim);
    launch_kernel(bwd_scores_kernel<scalar_t, AccT>, blocks_for(g.queries * g.window),
                  kThreads, 0, stream,
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        go.const_data_ptr<scalar_t>(), rpb.defined() ? rpb.const_data_ptr<scalar_t>() : nullptr,
        lse.const_data_ptr<AccT>(), delta.const_data_ptr<AccT>(), p.mutable_data_ptr<AccT>(),
        ds.mutable_data_ptr<AccT>(), g, static_cast<AccT>(scale));
  });
  launch_av(ds, k, grad_q, g, scale, stream);
}

// ------------------------------------------------------------------ tiled path
template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads)
    fused_bwd_tiled_kernel(const T* __restrict__ query, const T* __restrict__ key,
                           const T* __restrict__ value, const T* __restrict__ grad_out,
                           const T* __restrict__ out, const T* __restrict__ rpb,
                           const float* __restrict__ lse, const float* __restrict__ grad_lse,
                           float* __restrict__ p_out, float* __restrict__ ds_out,
                           T* __restrict__ grad_q, const Geometry g, const float scale,
                           const TileConfig tc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSmem<T> sm = tile_smem<T>(smem_raw, tc);
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x - group * G;
  const int64_t D = g.dim;

  for_each_tile(key, value, rpb, sm, g, tc, group, [&](const TileQuery& tq, const Tile&) {
    const int64_t row = tq.index * D;
    float qreg[DPT], greg[DPT], dq[DPT];
    float delta = 0.f;
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
      const int64_t d = lane + u * G;
      const bool in = d < D;
      qreg[u] = in ? static_cast<float>(query[row + d]) * scale : 0.f;
      greg[u] = in ? static_cast<float>(grad_out[row + d]) : 0.f;
      delta += in ? greg[u] * static_cast<float>(out[row + d]) : 0.f;
      dq[u] = 0.f;
    }
    delta = group_sum<G>(delta);
    if (grad_lse != nullptr) delta -= grad_lse[tq.index];  // ds then carries p * grad_lse
    const float lse_q = lse[tq.index];
    float* p_row = p_out + tq.index * g.window;
    float* ds_row = ds_out + tq.index * g.window;

    for (int64_t m = 0; m < g.kh; ++m) {
      const int64_t key_row = tq.key_row0 + m * tc.halo_w;
      const float* brow = sm.bias + tq.bias0 + m * g.bias_w;
      for (int64_t n = 0; n < g.kw; ++n) {
        const T* kp = sm.keys + (key_row + n) * tc.stride;
        const T* vp = sm.values + (key_row + n) * tc.stride;
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int u = 0; u < DPT; ++u) {
          const int64_t d = lane + u * G;
          if (d < D) {
            s += qreg[u] * static_cast<float>(kp[d]);
            dp += greg[u] * static_cast<float>(vp[d]);
          }
        }
        s = group_sum<G>(s);
        dp = group_sum<G>(dp);
        if (rpb != nullptr) s += brow[n];
        const float p = __expf(s - lse_q);
        const float ds = p * (dp - delta);
        const int64_t nb = m * g.kw + n;
        if (tq.active && lane == static_cast<int>(nb % G)) {  // one lane writes each entry
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
    if (tq.active) {
#pragma unroll
      for (int u = 0; u < DPT; ++u) {
        const int64_t d = lane + u * G;
        if (d < D) grad_q[row + d] = static_cast<T>(dq[u] * scale);
      }
    }
  });
}

// Key side: grad_k = scale * sum ds * q and grad_v = sum p * grad_out over the queries
// that see each key; the tile's query halo (q, grad_out) sits in shared memory.
template <typename T, int G, int DPT>
__global__ void __launch_bounds__(kThreads)
    fused_bwd_keys_tiled_kernel(const T* __restrict__ query, const T* __restrict__ grad_out,
                                const float* __restrict__ p_map,
                                const float* __restrict__ ds_map, T* __restrict__ grad_k,
                                T* __restrict__ grad_v, const Geometry g, const float scale,
                                const TileConfig tc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSmem<T> sm = tile_smem<T>(smem_raw, tc);  // keys <- q, values <- grad_out
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x - group * G;
  const int64_t D = g.dim;

  for_each_tile(query, grad_out, static_cast<const T*>(nullptr), sm, g, tc, group,
                [&](const TileQuery& tk, const Tile& t) {
    float gk[DPT], gv[DPT];
#pragma unroll
    for (int u = 0; u < DPT; ++u) gk[u] = gv[u] = 0.f;
    for_each_query_of_key(tk.sub_h, tk.sub_w, t, g, 0, 1,
                          [&](int64_t entry, int64_t qh, int64_t qw) {
      const float pv = p_map[entry], dsv = ds_map[entry];
      const int64_t slot = ((qh - t.k0h) * tc.halo_w + qw - t.k0w) * tc.stride;
      const T* qs = sm.keys + slot;
      const T* gs = sm.values + slot;
#pragma unroll
      for (int u = 0; u < DPT; ++u) {
        const int64_t d = lane + u * G;
        if (d < D) {
          gk[u] += dsv * static_cast<float>(qs[d]);
          gv[u] += pv * static_cast<float>(gs[d]);
        }
      }
    });
    if (tk.active) {
#pragma unroll
      for (int u = 0; u < DPT; ++u) {
        const int64_t d = lane + u * G;
        if (d < D) {
          grad_k[tk.index * D + d] = static_cast<T>(gk[u] * scale);
          grad_v[tk.index * D + d] = static_cast<T>(gv[u]);
        }
      }
    }
  });
}

template <typename T>
bool key_side_tiled(const at::Tensor& q, const at::Tensor& go, const at::Tensor& p,
                    const at::Tensor& ds, const at::Tensor& grad_k, const at::Tensor& grad_v,
                    const Geometry& g, double scale, cudaStream_t stream) {
  return with_group_shape(g.dim, [&](auto group, auto per_thread) {
    constexpr int G = decltype(group)::value, DPT = decltype(per_thread)::value;
    return launch_tiled<T, G>(fused_bwd_keys_tiled_kernel<T, G, DPT>, true, g,
                              static_cast<float>(scale), q.device().index(), stream,
                              q.const_data_ptr<T>(), go.const_data_ptr<T>(),
                              p.const_data_ptr<float>(), ds.const_data_ptr<float>(),
                              grad_k.mutable_data_ptr<T>(), grad_v.mutable_data_ptr<T>());
  });
}

template <typename T>
bool query_side_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& go, const at::Tensor& o, const at::Tensor& rpb,
                      const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& p,
                      const at::Tensor& ds, const at::Tensor& grad_q, const Geometry& g,
                      double scale, cudaStream_t stream) {
  return with_group_shape(g.dim, [&](auto group, auto per_thread) {
    constexpr int G = decltype(group)::value, DPT = decltype(per_thread)::value;
    return launch_tiled<T, G>(
        fused_bwd_tiled_kernel<T, G, DPT>, false, g, static_cast<float>(scale), q.device().index(),
        stream, q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
        go.const_data_ptr<T>(), o.const_data_ptr<T>(),
        rpb.defined() ? rpb.const_data_ptr<T>() : nullptr, lse.const_data_ptr<float>(),
        grad_lse.defined() ? grad_lse.const_data_ptr<float>() : nullptr,
        p.mutable_data_ptr<float>(), ds.mutable_data_ptr<float>(), grad_q.mutable_data_ptr<T>());
  });
}

}  // namespace cuda_detail

using namespace cuda_detail;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_fused_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const std::optional<at::Tensor>& rpb, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef kernel_size, at::IntArrayRef dilation, double scale,
    const std::optional<at::Tensor>& grad_lse) {
  check_fused_backward_args(grad_out, query, key, value, rpb, out, lse, kernel_size, dilation,
                            grad_lse);
  c10::cuda::CUDAGuard guard(query.device());
  const auto dtype = query.scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  // grad_out and out have the query's dtype (check_fused_backward_args)
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous();
  const at::Tensor ls = lse.to(acc_type).contiguous();
  const at::Tensor gls = is_given(grad_lse) ? grad_lse->to(acc_type).contiguous() : at::Tensor();
  const at::Tensor bias = is_given(rpb) ? rpb->contiguous() : at::Tensor();
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

  const bool mma = g.dim > 0 && backward_query_side_mma(q, k, v, go, o, bias, ls, gls, p, ds,
                                                        grad_q, g, scale, stream);
  const bool done = mma || (g.dim > 0 && with_tiled_type(dtype, [&](auto type) {
                              return query_side_tiled<decltype(type)>(
                                  q, k, v, go, o, bias, ls, gls, p, ds, grad_q, g, scale, stream);
                            }));
  if (!done) query_side_simple(q, k, v, go, o, bias, ls, gls, p, ds, grad_q, g, scale, stream);
  // the key side's tiles are larger (query halo): they may not fit where the query side's did
  const bool keys_done =
      done && (backward_key_side_mma(q, go, p, ds, grad_k, grad_v, g, scale, stream) ||
               with_tiled_type(dtype, [&](auto type) {
                 return key_side_tiled<decltype(type)>(q, go, p, ds, grad_k, grad_v, g, scale,
                                                       stream);
               }));
  if (!keys_done) launch_inverse(ds, q, grad_k, scale, p, go, grad_v, 1.0, g, stream);
  launch_rpb_grad(ds, grad_rpb, g, stream);
  return {grad_q, grad_k, grad_v, grad_rpb};
}

}  // namespace nat_mm
