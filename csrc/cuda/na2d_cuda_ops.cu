// Straightforward CUDA kernels of 2D neighborhood attention: one thread per output
// element, always correct for every shape, dtype, kernel size and dilation. They serve the
// unfused ops (na2d_qk, na2d_av, na2d_inverse, na2d_rpb_grad) and are the building blocks
// (and test oracle) of the fused ops.
//
//   qk       one thread per (query, neighbor): a head_dim dot product (+ rpb)
//   av       one thread per (query, channel): sum over the window; channels adjacent in a
//            warp, so value reads are coalesced
//   inverse  one thread per (key, channel): gathers over the queries that see the key
//            (axis_inverse), so no atomics and a fixed summation order
//   rpb_grad two deterministic passes: per (head, chunk of rows) partial sums of every bias
//            bin, then a fixed-order sum over the chunks
#include "na2d_cuda_common.cuh"
#include "na2d_kernels.h"

namespace nat_mm {
namespace cuda_detail {

// ------------------------------------------------------------------ kernels
template <typename T, typename OutT, typename AccT>
__global__ void __launch_bounds__(kThreads)
    qk_kernel(const T* __restrict__ query, const T* __restrict__ key, const T* __restrict__ rpb,
              OutT* __restrict__ out, const Geometry g, const AccT scale) {
  for_each_thread_index(g.queries * g.window, [&](int64_t idx) {
    const QueryNeighbor qn = query_neighbor(idx, g);
    const T* qp = query + qn.query * g.dim;
    const T* kp = key + qn.key * g.dim;
    AccT acc0 = 0, acc1 = 0;
    int64_t d = 0;
    for (; d + 1 < g.dim; d += 2) {
      acc0 += static_cast<AccT>(qp[d]) * static_cast<AccT>(kp[d]);
      acc1 += static_cast<AccT>(qp[d + 1]) * static_cast<AccT>(kp[d + 1]);
    }
    if (d < g.dim) acc0 += static_cast<AccT>(qp[d]) * static_cast<AccT>(kp[d]);
    AccT acc = (acc0 + acc1) * scale;
    if (rpb != nullptr) acc += static_cast<AccT>(rpb[qn.bias]);
    out[idx] = static_cast<OutT>(acc);
  });
}

template <typename WT, typename VT, typename AccT>
__global__ void __launch_bounds__(kThreads)
    av_kernel(const WT* __restrict__ weights, const VT* __restrict__ value,
              VT* __restrict__ out, const Geometry g, const AccT alpha) {
  for_each_thread_index(g.queries * g.dim, [&](int64_t idx) {
    const MapIndex pos = map_index(idx, g.dim, g);  // query pos.pixel, channel pos.inner
    const AxisWindow wr = axis_window(pos.i, g.height, g.kh, g.dh);
    const AxisWindow wc = axis_window(pos.j, g.width, g.kw, g.dw);
    const WT* wp = weights + pos.pixel * g.window;
    const VT* vbase = value + pos.bh * g.height * g.width * g.dim + pos.inner;
    AccT acc = 0;
    for (int64_t m = 0; m < g.kh; ++m) {
      const VT* vrow = vbase + wr.key(m) * g.width * g.dim;
      const WT* wrow = wp + m * g.kw;
      for (int64_t n = 0; n < g.kw; ++n) {
        acc += static_cast<AccT>(wrow[n]) * static_cast<AccT>(vrow[wc.key(n) * g.dim]);
      }
    }
    out[idx] = static_cast<VT>(acc * alpha);
  });
}

// Column neighbor indices of the queries that see a key are cached per thread when there
// are at most this many of them (always for kernel widths <= 32).
constexpr int kInverseCache = 32;

template <typename WT, typename ST, typename AccT>
__global__ void __launch_bounds__(kThreads)
    inverse_kernel(const WT* __restrict__ w1, const ST* __restrict__ s1, ST* __restrict__ o1,
                   const AccT a1, const WT* __restrict__ w2, const ST* __restrict__ s2,
                   ST* __restrict__ o2, const AccT a2, const Geometry g) {
  const bool two = w2 != nullptr;
  for_each_thread_index(g.queries * g.dim, [&](int64_t idx) {
    const MapIndex pos = map_index(idx, g.dim, g);  // key pos.pixel, channel pos.inner
    const InverseRange ir = axis_inverse(pos.i, g.height, g.kh, g.dh);
    const InverseRange ic = axis_inverse(pos.j, g.width, g.kw, g.dw);
    const int64_t key_sub_r = pos.i / g.dh;
    const int64_t key_sub_c = pos.j / g.dw;
    const int64_t ncols = ic.last - ic.first + 1;
    int col_nb[kInverseCache];
    const int64_t cached = ncols <= kInverseCache ? ncols : 0;
    for (int64_t c = 0; c < cached; ++c) {
      const AxisWindow wc = axis_window(ic.query(ic.first + c), g.width, g.kw, g.dw);
      col_nb[c] = static_cast<int>(key_sub_c - wc.start);
    }
    const int64_t map_base = pos.bh * g.height * g.width;
    AccT acc1 = 0, acc2 = 0;
    for (int64_t sr = ir.first; sr <= ir.last; ++sr) {
      const int64_t qi = ir.query(sr);
      const AxisWindow wr = axis_window(qi, g.height, g.kh, g.dh);
      const int64_t m = key_sub_r - wr.start;
      if (m < 0 || m >= g.kh) continue;  // cannot happen (axis_inverse), kept as a guard
      for (int64_t c = 0; c < ncols; ++c) {
        int64_t n;
        if (c < cached) {
          n = col_nb[c];
        } else {
          n = key_sub_c - axis_window(ic.query(ic.first + c), g.width, g.kw, g.dw).start;
        }
        if (n < 0 || n >= g.kw) continue;
        const int64_t qidx = map_base + qi * g.width + ic.query(ic.first + c);
        const int64_t w_off = qidx * g.window + m * g.kw + n;
        const int64_t s_off = qidx * g.dim + pos.inner;
        acc1 += static_cast<AccT>(w1[w_off]) * static_cast<AccT>(s1[s_off]);
        if (two) acc2 += static_cast<AccT>(w2[w_off]) * static_cast<AccT>(s2[s_off]);
      }
    }
    o1[idx] = static_cast<ST>(acc1 * a1);
    if (two) o2[idx] = static_cast<ST>(acc2 * a2);
  });
}

// Pass 1: block (head, chunk) computes, for every bias bin, the sum over its chunk of
// (batch, row) pairs, in a fixed order. Columns are walked per dilation residue class on
// its sub-grid, so a column's window start needs no division and no table.
template <typename WT, typename AccT>
__global__ void rpb_partial_kernel(const WT* __restrict__ grad_attn, AccT* __restrict__ partial,
                                   const Geometry g, const int64_t rows_per_chunk,
                                   const int64_t chunks) {
  const int64_t bins = g.bias_h * g.bias_w;
  const int64_t rows = g.batch * g.height;
  for (int64_t blk = blockIdx.x; blk < g.heads * chunks; blk += gridDim.x) {
    const int64_t h = blk / chunks;
    const int64_t chunk = blk - h * chunks;
    const int64_t r0 = chunk * rows_per_chunk;
    const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    for (int64_t bin = threadIdx.x; bin < bins; bin += blockDim.x) {
      const int64_t bi = bin / g.bias_w;
      const int64_t bj = bin - bi * g.bias_w;
      AccT acc = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / g.height;
        const int64_t i = r - b * g.height;
        const int64_t m = bi - axis_window(i, g.height, g.kh, g.dh).bias(0, g.kh);
        if (m < 0 || m >= g.kh) continue;
        const WT* base =
            grad_attn + ((b * g.heads + h) * g.height + i) * g.width * g.window + m * g.kw;
        for (int64_t rj = 0; rj < g.dw; ++rj) {
          const int64_t len = subgrid_length(g.width, g.dw, rj);
          for (int64_t s = 0; s < len; ++s) {
            // neighbor whose bias column is bj: bias(n) = start + n - s + kw - 1
            const int64_t n = bj - (sub_window_start(s, len, g.kw) - s + g.kw - 1);
            if (n >= 0 && n < g.kw) acc += static_cast<AccT>(base[(s * g.dw + rj) * g.window + n]);
          }
        }
      }
      partial[(h * chunks + chunk) * bins + bin] = acc;
    }
  }
}

// Pass 2: out[h, bin] = sum over chunks, in chunk order.
template <typename AccT, typename OutT>
__global__ void __launch_bounds__(kThreads)
    rpb_reduce_kernel(const AccT* __restrict__ partial, OutT* __restrict__ out,
                      const int64_t heads, const int64_t chunks, const int64_t bins) {
  for_each_thread_index(heads * bins, [&](int64_t idx) {
    const int64_t h = idx / bins;
    const int64_t bin = idx - h * bins;
    const AccT* p = partial + h * chunks * bins + bin;
    AccT acc = 0;
    for (int64_t c = 0; c < chunks; ++c) acc += p[c * bins];
    out[idx] = static_cast<OutT>(acc);
  });
}

// ------------------------------------------------------------------ launchers
template <typename T>
using acc_t = at::opmath_type<T>;

void launch_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& rpb,
               const at::Tensor& out, const Geometry& g, double scale, cudaStream_t stream) {
  if (g.queries * g.window == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "na2d_qk_cuda", [&] {
    using AccT = acc_t<scalar_t>;
    const scalar_t* rpb_ptr = rpb.defined() ? rpb.const_data_ptr<scalar_t>() : nullptr;
    if (out.scalar_type() == q.scalar_type()) {
      launch_kernel(qk_kernel<scalar_t, scalar_t, AccT>, blocks_for(g.queries * g.window),
                    kThreads, 0, stream,
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), rpb_ptr,
          out.mutable_data_ptr<scalar_t>(), g, static_cast<AccT>(scale));
    } else {
      TORCH_CHECK(out.scalar_type() == c10::CppTypeToScalarType<AccT>::value,
                  "nat_mm: internal: qk output dtype ", out.scalar_type());
      launch_kernel(qk_kernel<scalar_t, AccT, AccT>, blocks_for(g.queries * g.window),
                    kThreads, 0, stream,
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), rpb_ptr,
          out.mutable_data_ptr<AccT>(), g, static_cast<AccT>(scale));
    }
  });
}

void launch_av(const at::Tensor& weights, const at::Tensor& value, const at::Tensor& out,
               const Geometry& g, double alpha, cudaStream_t stream) {
  if (g.queries * g.dim == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "na2d_av_cuda", [&] {
    using AccT = acc_t<scalar_t>;
    TORCH_CHECK(out.scalar_type() == value.scalar_type(), "nat_mm: internal: av output dtype");
    if (weights.scalar_type() == value.scalar_type()) {
      launch_kernel(av_kernel<scalar_t, scalar_t, AccT>, blocks_for(g.queries * g.dim),
                    kThreads, 0, stream,
          weights.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), g, static_cast<AccT>(alpha));
    } else {
      TORCH_CHECK(weights.scalar_type() == c10::CppTypeToScalarType<AccT>::value,
                  "nat_mm: internal: av weights dtype ", weights.scalar_type());
      launch_kernel(av_kernel<AccT, scalar_t, AccT>, blocks_for(g.queries * g.dim),
                    kThreads, 0, stream,
          weights.const_data_ptr<AccT>(), value.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), g, static_cast<AccT>(alpha));
    }
  });
}

void launch_inverse(const at::Tensor& w1, const at::Tensor& s1, const at::Tensor& out1,
                    double alpha1, const at::Tensor& w2, const at::Tensor& s2,
                    const at::Tensor& out2, double alpha2, const Geometry& g,
                    cudaStream_t stream) {
  if (g.queries * g.dim == 0) return;
  const bool two = w2.defined();
  if (two) {
    TORCH_CHECK(w2.scalar_type() == w1.scalar_type() && s2.scalar_type() == s1.scalar_type() &&
                    out2.scalar_type() == out1.scalar_type(),
                "nat_mm: internal: inverse pair dtypes differ");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s1.scalar_type(), "na2d_inverse_cuda", [&] {
    using AccT = acc_t<scalar_t>;
    TORCH_CHECK(out1.scalar_type() == s1.scalar_type(), "nat_mm: internal: inverse output dtype");
    auto run = [&](auto w_tag) {
      using WT = decltype(w_tag);
      launch_kernel(inverse_kernel<WT, scalar_t, AccT>, blocks_for(g.queries * g.dim),
                    kThreads, 0, stream,
          w1.const_data_ptr<WT>(), s1.const_data_ptr<scalar_t>(),
          out1.mutable_data_ptr<scalar_t>(), static_cast<AccT>(alpha1),
          two ? w2.const_data_ptr<WT>() : nullptr, two ? s2.const_data_ptr<scalar_t>() : nullptr,
          two ? out2.mutable_data_ptr<scalar_t>() : nullptr, static_cast<AccT>(alpha2), g);
    };
    if (w1.scalar_type() == s1.scalar_type()) {
      run(scalar_t{});
    } else {
      TORCH_CHECK(w1.scalar_type() == c10::CppTypeToScalarType<AccT>::value,
                  "nat_mm: internal: inverse weights dtype ", w1.scalar_type());
      run(AccT{});
    }
  });
}

void launch_rpb_grad(const at::Tensor& grad_attn, const at::Tensor& out, const Geometry& g,
                     cudaStream_t stream) {
  const int64_t bins = g.bias_h * g.bias_w;
  const int64_t rows = g.batch * g.height;
  if (g.heads * bins == 0) return;
  // Fixed chunking that depends on the shape only, so the summation order (and the
  // result, bit for bit) is the same on every run and every device.
  const int64_t target_blocks = 1024;
  int64_t chunks = (target_blocks + g.heads - 1) / g.heads;
  if (chunks > rows) chunks = rows;
  if (chunks < 1) chunks = 1;
  const int64_t rows_per_chunk = rows > 0 ? (rows + chunks - 1) / chunks : 1;
  if (rows > 0) chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const auto acc_type = grad_attn.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({g.heads * chunks * bins}, grad_attn.options().dtype(acc_type));
  const int threads = bins >= kThreads ? kThreads : static_cast<int>((bins + 31) / 32 * 32);
  const int64_t grid64 = g.heads * chunks;
  const unsigned int grid = static_cast<unsigned int>(grid64 < (1 << 20) ? grid64 : (1 << 20));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "na2d_rpb_grad_cuda", [&] {
    using AccT = acc_t<scalar_t>;
    auto run = [&](auto w_tag) {
      using WT = decltype(w_tag);
      launch_kernel(rpb_partial_kernel<WT, AccT>, grid, threads, 0, stream,
          grad_attn.const_data_ptr<WT>(), partial.mutable_data_ptr<AccT>(), g, rows_per_chunk,
          chunks);
    };
    if (rows > 0) {
      if (grad_attn.scalar_type() == out.scalar_type()) {
        run(scalar_t{});
      } else {
        TORCH_CHECK(grad_attn.scalar_type() == c10::CppTypeToScalarType<AccT>::value,
                    "nat_mm: internal: rpb grad input dtype ", grad_attn.scalar_type());
        run(AccT{});
      }
    } else {
      partial.zero_();
    }
    launch_kernel(rpb_reduce_kernel<AccT, scalar_t>, blocks_for(g.heads * bins),
                  kThreads, 0, stream,
        partial.const_data_ptr<AccT>(), out.mutable_data_ptr<scalar_t>(), g.heads, chunks, bins);
  });
}

}  // namespace cuda_detail

// ------------------------------------------------------------------ the unfused ops
using namespace cuda_detail;

at::Tensor na2d_qk_cuda(const at::Tensor& query, const at::Tensor& key,
                        const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
                        at::IntArrayRef dilation) {
  check_qk_args(query, key, rpb, kernel_size, dilation);
  c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = key.contiguous();
  const at::Tensor bias = is_given(rpb) ? rpb->contiguous() : at::Tensor();
  const Geometry g = make_geometry(q, q.size(4), kernel_size, dilation);
  at::Tensor out = at::empty({g.batch, g.heads, g.height, g.width, g.window}, q.options());
  launch_qk(q, k, bias, out, g, 1.0, current_stream(q));
  return out;
}

at::Tensor na2d_av_cuda(const at::Tensor& attn, const at::Tensor& value,
                        at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  check_weights_args(attn, "attn", value, "value", kernel_size, dilation);
  c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor a = attn.contiguous(), v = value.contiguous();
  const Geometry g = make_geometry(v, v.size(4), kernel_size, dilation);
  at::Tensor out = at::empty(v.sizes(), v.options());
  launch_av(a, v, out, g, 1.0, current_stream(v));
  return out;
}

at::Tensor na2d_inverse_cuda(const at::Tensor& weights, const at::Tensor& source,
                             at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  check_weights_args(weights, "weights", source, "source", kernel_size, dilation);
  c10::cuda::CUDAGuard guard(source.device());
  const at::Tensor w = weights.contiguous(), s = source.contiguous();
  const Geometry g = make_geometry(s, s.size(4), kernel_size, dilation);
  at::Tensor out = at::empty(s.sizes(), s.options());
  launch_inverse(w, s, out, 1.0, at::Tensor(), at::Tensor(), at::Tensor(), 0.0, g,
                 current_stream(s));
  return out;
}

at::Tensor na2d_rpb_grad_cuda(const at::Tensor& grad_attn, at::IntArrayRef kernel_size,
                              at::IntArrayRef dilation) {
  check_rpb_grad_args(grad_attn, kernel_size, dilation);
  c10::cuda::CUDAGuard guard(grad_attn.device());
  const at::Tensor ga = grad_attn.contiguous();
  const Geometry g = make_geometry(ga, 0, kernel_size, dilation);
  at::Tensor out = at::empty({g.heads, g.bias_h, g.bias_w}, ga.options());
  launch_rpb_grad(ga, out, g, current_stream(ga));
  return out;
}

}  // namespace nat_mm
