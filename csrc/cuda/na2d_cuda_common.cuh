// Shared pieces of the CUDA neighborhood-attention kernels: geometry, argument checks,
// launch helpers, warp reductions and the host-side entry points that one translation
// unit defines and another calls.
//
// Only light headers are included (no <torch/extension.h>, no CUDAContext.h and its
// cuBLAS/cuSPARSE includes) so that every .cu file compiles in seconds.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#ifdef NAT_MM_CUDA_EMULATION  // the CPU test build of these sources (csrc/emulation/)
#include "emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "na2d_checks.h"
#include "na2d_index.h"

namespace nat_mm {
namespace cuda_detail {

// ------------------------------------------------------------------ geometry
// One problem: tensors [B, heads, H, W, D] heads-first and contiguous, attention maps
// [B, heads, H, W, kh*kw]. Every field is 64-bit so that index products never overflow.
struct Geometry {
  int64_t batch, heads, height, width, dim;
  int64_t kh, kw, dh, dw;
  int64_t window;  // kh * kw
  int64_t bh;      // batch * heads
  int64_t queries;  // batch * heads * height * width
  int64_t bias_h, bias_w;  // 2k-1 per axis
};

inline Geometry make_geometry(const at::Tensor& t, int64_t last_dim, at::IntArrayRef kernel_size,
                              at::IntArrayRef dilation) {
  Geometry g;
  g.batch = t.size(0);
  g.heads = t.size(1);
  g.height = t.size(2);
  g.width = t.size(3);
  g.dim = last_dim;
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.window = g.kh * g.kw;
  g.bh = g.batch * g.heads;
  g.queries = g.bh * g.height * g.width;
  g.bias_h = 2 * g.kh - 1;
  g.bias_w = 2 * g.kw - 1;
  return g;
}

// ------------------------------------------------------------------ launch helpers
constexpr int kThreads = 256;

// 1-D grid over an int64 count; kernels loop grid-stride, so the cap only bounds the
// grid size (gridDim.x allows 2^31-1; y/z are never used).
inline unsigned int blocks_for(int64_t count, int threads = kThreads) {
  const int64_t blocks = (count + threads - 1) / threads;
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// kernel<<<grid, threads, smem, stream>>>(args...) and the launch check; every launch goes
// through here, so the CPU emulation (csrc/emulation/) can run the kernels instead.
#ifdef NAT_MM_CUDA_EMULATION
using emulation::launch_kernel;
#else
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned int grid, int threads, size_t smem,
                   cudaStream_t stream, Args... args) {
  kernel<<<grid, threads, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

struct DeviceLimits {
  int sm_count = 0;
  int smem_optin = 0;    // max dynamic shared memory per block after opt-in
  int smem_default = 0;  // without opt-in
  int major = 0;         // compute capability (tensor-core kernels need 8.0)
};

inline DeviceLimits device_limits(int device) {
  // A handful of devices at most: cache per index (benign race: same values written).
  static DeviceLimits cache[64];
  static bool ready[64] = {false};
  if (device >= 0 && device < 64 && ready[device]) return cache[device];
  DeviceLimits lim;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&lim.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&lim.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&lim.smem_default, cudaDevAttrMaxSharedMemoryPerBlock, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&lim.major, cudaDevAttrComputeCapabilityMajor, device));
  if (device >= 0 && device < 64) {
    cache[device] = lim;
    ready[device] = true;
  }
  return lim;
}

// Kernel choice switches, read at each call so tests can flip them: set and not "0".
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

// NAT_MM_CUDA_FORCE_SIMPLE=1: every op takes the straightforward kernels (the test oracle).
inline bool force_simple() { return env_flag("NAT_MM_CUDA_FORCE_SIMPLE"); }

// NAT_MM_CUDA_TENSOR_CORES=1: the fused ops take the tensor-core kernels where they apply.
// Opt-in until a GPU run has verified and timed them: they were written and compile-checked
// in a session whose GPU machine was withdrawn before they could run; they pass the CPU
// emulation's tests (tests/test_cuda_emulation.py) since 2026-12-07 (docs/gpu.md).
inline bool tensor_cores_enabled() { return env_flag("NAT_MM_CUDA_TENSOR_CORES"); }

// ------------------------------------------------------------------ device helpers
// Quotient and remainder of non-negative int64 values; 32-bit hardware division when
// both fit (64-bit division is a long software routine on the GPU).
__device__ __forceinline__ int64_t div_fast(int64_t a, int64_t b) {
  if (((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  return a / b;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T y = __shfl_xor_sync(0xffffffffu, x, offset);
    x = y > x ? y : x;
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T exp_acc(T x);
template <>
__device__ __forceinline__ float exp_acc<float>(float x) {
  return __expf(x);
}
template <>
__device__ __forceinline__ double exp_acc<double>(double x) {
  return exp(x);
}

template <typename T>
__device__ __forceinline__ T log_acc(T x);
template <>
__device__ __forceinline__ float log_acc<float>(float x) {
  return logf(x);
}
template <>
__device__ __forceinline__ double log_acc<double>(double x) {
  return log(x);
}

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -__int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -__longlong_as_double(0x7ff0000000000000LL);
}

// Grid-stride loops over [0, total): body(i) once per index, one index per thread
// (for_each_thread_index) or per warp (for_each_warp_index: every lane of the warp calls
// body with the same index; blockDim.x a multiple of 32).
template <typename Body>
__device__ __forceinline__ void for_each_thread_index(int64_t total, Body&& body) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    body(i);
  }
}

template <typename Body>
__device__ __forceinline__ void for_each_warp_index(int64_t total, Body&& body) {
  const int64_t warps = blockDim.x / 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32; i < total;
       i += step) {
    body(i);
  }
}

// A flat index over [B*heads, H, W, inner] (inner: neighbors or channels): the pixel
// (flat over B*heads*H*W), its plane bh = batch*heads + head, row i, column j, and the
// inner index.
struct MapIndex {
  int64_t pixel, inner, bh, i, j;
};

__device__ __forceinline__ MapIndex map_index(int64_t idx, int64_t inner, const Geometry& g) {
  MapIndex r;
  r.pixel = div_fast(idx, inner);
  r.inner = idx - r.pixel * inner;
  const int64_t row = div_fast(r.pixel, g.width);
  r.j = r.pixel - row * g.width;
  r.bh = div_fast(row, g.height);
  r.i = row - r.bh * g.height;
  return r;
}

// One (query, neighbor) pair of a flat index over [B*heads*H*W, kh*kw]: the query, its
// neighbor (m, n), the neighbor's key and its rpb entry.
struct QueryNeighbor {
  int64_t query;  // flat query index
  int64_t key;    // flat key index
  int64_t bias;   // index into rpb [heads, 2kh-1, 2kw-1]
};

__device__ __forceinline__ QueryNeighbor query_neighbor(int64_t idx, const Geometry& g) {
  const MapIndex pos = map_index(idx, g.window, g);
  const int64_t m = div_fast(pos.inner, g.kw);
  const int64_t n = pos.inner - m * g.kw;
  const AxisWindow wr = axis_window(pos.i, g.height, g.kh, g.dh);
  const AxisWindow wc = axis_window(pos.j, g.width, g.kw, g.dw);
  QueryNeighbor r;
  r.query = pos.pixel;
  r.key = (pos.bh * g.height + wr.key(m)) * g.width + wc.key(n);
  const int64_t h = pos.bh - div_fast(pos.bh, g.heads) * g.heads;
  r.bias = (h * g.bias_h + wr.bias(m, g.kh)) * g.bias_w + wc.bias(n, g.kw);
  return r;
}

// ------------------------------------------------------------------ cross-TU entry points
// Defined in na2d_cuda_ops.cu, used by the fused backward (na2d_cuda_fused_bwd.cu).
// All tensors contiguous and on the current device; `weights` is float32/float64 or the
// input dtype; outputs are written in their own dtype.

// out[q, n] = scale * (query[q] . key[nbr(q, n)]) + rpb[bin(q, n)]; out is query's dtype or
// float32/float64 (the accumulation type).
void launch_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& rpb,
               const at::Tensor& out, const Geometry& g, double scale, cudaStream_t stream);

// out = alpha * AV(weights, value): out[q, d] = alpha * sum_n weights[q, n] * value[nbr(q, n), d]
void launch_av(const at::Tensor& weights, const at::Tensor& value, const at::Tensor& out,
               const Geometry& g, double alpha, cudaStream_t stream);

// out1[key, d] = alpha1 * sum over (q, n) hitting key of w1[q, n] * s1[q, d]; likewise out2
// when w2 is defined (sharing the index math).
void launch_inverse(const at::Tensor& w1, const at::Tensor& s1, const at::Tensor& out1,
                    double alpha1, const at::Tensor& w2, const at::Tensor& s2,
                    const at::Tensor& out2, double alpha2, const Geometry& g,
                    cudaStream_t stream);

// Fused forward on tensor cores (na2d_cuda_fused_mma.cu) for float16/bfloat16; false
// (nothing launched) where it does not apply: the caller then takes the tiled kernel.
bool fused_forward_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& rpb, const at::Tensor& out, const at::Tensor& lse,
                       const Geometry& g, double scale, cudaStream_t stream);

// The fused backward's query side (p, ds maps and grad_q) on tensor cores, likewise.
bool backward_query_side_mma(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& go, const at::Tensor& o, const at::Tensor& rpb,
                             const at::Tensor& lse, const at::Tensor& grad_lse,
                             const at::Tensor& p, const at::Tensor& ds, const at::Tensor& grad_q,
                             const Geometry& g, double scale, cudaStream_t stream);

// The fused backward's key side (grad_k, grad_v from the p and ds maps) on tensor cores,
// likewise.
bool backward_key_side_mma(const at::Tensor& q, const at::Tensor& go, const at::Tensor& p,
                           const at::Tensor& ds, const at::Tensor& grad_k,
                           const at::Tensor& grad_v, const Geometry& g, double scale,
                           cudaStream_t stream);

// out[h, bi, bj] = sum of grad_attn entries whose bias bin is (bi, bj); deterministic.
void launch_rpb_grad(const at::Tensor& grad_attn, const at::Tensor& out, const Geometry& g,
                     cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace nat_mm
