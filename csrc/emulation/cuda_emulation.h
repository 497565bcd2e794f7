// CPU emulation of the parts of CUDA that this project's kernels use, so that the very
// sources under csrc/cuda/ run (slowly, on small problems) on a machine without a GPU:
// CI tests them against the reference (tests/test_cuda_emulation.py).
//
// Built only into the test library (NAT_MM_CUDA_EMULATION; csrc/cuda/na2d_cuda_common.cuh
// includes this header instead of the CUDA runtime). Execution model
// (csrc/emulation/cuda_emulation.cpp): the blocks of a launch run one after another; the
// threads of a block are fibers on one OS thread, each running until it reaches a barrier
// (__syncthreads, __syncwarp, a shuffle or a wmma collective) or returns. The emulated
// device has an H100's limits. What a GPU would reject or leave undefined is an error
// here: a launch past the shared-memory or thread limits, barriers that diverge (a
// deadlock), a warp collective with exited lanes, misaligned 16-byte or wmma accesses, a
// write past the dynamic shared memory. Shared memory starts as NaN bytes (0xFF) in every
// block (NAT_MM_EMULATION_POISON=huge: 0x7F, for reads that a max() would skip as NaN), so
// a read of what no thread wrote shows up in the result, and a lane's part of a wmma store
// appears only when that lane runs, so a missing __syncwarp shows up too
// (NAT_MM_EMULATION_ORDER=reverse runs the threads of a block in reverse order).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlock,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrComputeCapabilityMajor,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaFuncAttributes {
  int ptxVersion = 0;
  int binaryVersion = 0;
};

namespace nat_mm {
namespace emulation {

// The emulated device: an H100's limits.
constexpr int kSmCount = 132;
constexpr int kSmemDefault = 48 * 1024;
constexpr int kSmemOptin = 227 * 1024;
constexpr int kComputeMajor = 9;
constexpr int kMaxThreads = 1024;
constexpr int kWarpSize = 32;

// Ends the running launch with `what` (an error raised by the launching call).
[[noreturn]] void fail(const std::string& what);

dim3 thread_idx();
dim3 block_idx();
dim3 block_dim();
dim3 grid_dim();
int lane_id();

// Barriers: every thread of the block / every lane of the warp. `op` names the call in
// error messages; lanes of one warp must wait in calls of the same kind.
void sync_threads();
void sync_warp(unsigned int mask = 0xffffffffu, const char* op = "__syncwarp");

// 8 bytes per lane of the running warp, for shuffles.
void* warp_exchange_slot(int lane);

void set_max_dynamic_smem(const void* kernel, int bytes);

// The kernels launched since the last call (demangled names, launch order), and clears it.
std::vector<std::string> take_launch_log();

// Runs body() as every thread of every block of a launch; raises on an error.
void run_grid(const void* kernel, unsigned int grid, int threads, size_t smem,
              const std::function<void()>& body);

// Checks a 16-byte vector access (the GPU faults on a misaligned one).
inline void check_vector_address(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    fail(std::string("misaligned 16-byte ") + what + " at " +
         std::to_string(reinterpret_cast<uintptr_t>(p)));
  }
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), unsigned int grid, int threads, size_t smem,
                   cudaStream_t, Args... args) {
  std::tuple<std::decay_t<Params>...> params(args...);  // converted once, as by a launch
  run_grid(reinterpret_cast<const void*>(kernel), grid, threads, smem,
           [&] { std::apply(kernel, params); });
}

}  // namespace emulation
}  // namespace nat_mm

#define threadIdx (::nat_mm::emulation::thread_idx())
#define blockIdx (::nat_mm::emulation::block_idx())
#define blockDim (::nat_mm::emulation::block_dim())
#define gridDim (::nat_mm::emulation::grid_dim())
#define __syncthreads() ::nat_mm::emulation::sync_threads()
#define __syncwarp(...) ::nat_mm::emulation::sync_warp(__VA_ARGS__)

// 16-byte vector; copies check their alignment like the GPU's 128-bit loads and stores.
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
  uint4(unsigned int a, unsigned int b, unsigned int c, unsigned int d) : x(a), y(b), z(c), w(d) {}
  uint4(const uint4& o) : x(o.x), y(o.y), z(o.z), w(o.w) {
    ::nat_mm::emulation::check_vector_address(&o, "load");
  }
  uint4& operator=(const uint4& o) {  // `*dst = *src` binds o to src: check both
    ::nat_mm::emulation::check_vector_address(&o, "load");
    ::nat_mm::emulation::check_vector_address(this, "store");
    x = o.x;
    y = o.y;
    z = o.z;
    w = o.w;
    return *this;
  }
};
inline uint4 make_uint4(unsigned int a, unsigned int b, unsigned int c, unsigned int d) {
  return uint4(a, b, c, d);
}

// ------------------------------------------------------------------ runtime API
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = nat_mm::emulation::kSmCount;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = nat_mm::emulation::kSmemDefault;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = nat_mm::emulation::kSmemOptin;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = nat_mm::emulation::kComputeMajor;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel) {
  attr->ptxVersion = 10 * nat_mm::emulation::kComputeMajor;
  attr->binaryVersion = attr->ptxVersion;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int value) {
  if (value < 0 || value > nat_mm::emulation::kSmemOptin) return cudaErrorInvalidValue;
  nat_mm::emulation::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

#define C10_CUDA_CHECK(expr)                                                         \
  do {                                                                               \
    const cudaError_t nat_mm_emulated_status = (expr);                               \
    TORCH_CHECK(nat_mm_emulated_status == cudaSuccess, "emulated CUDA call failed: ", \
                #expr);                                                              \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10

// ------------------------------------------------------------------ device functions
inline float __expf(float x) { return std::exp(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof(d));
  return d;
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "8-byte shuffles");
  using namespace nat_mm::emulation;
  if (width != kWarpSize || lane_mask < 0 || lane_mask >= kWarpSize) {
    fail("__shfl_xor_sync: lane mask " + std::to_string(lane_mask) + " / width " +
         std::to_string(width) + " not emulated");
  }
  std::memcpy(warp_exchange_slot(lane_id()), &value, sizeof(T));
  sync_warp(mask, "__shfl_xor_sync");
  T out;
  std::memcpy(&out, warp_exchange_slot(lane_id() ^ lane_mask), sizeof(T));
  sync_warp(mask, "__shfl_xor_sync");  // no lane overwrites its slot before all have read
  return out;
}

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float x) { return c10::Half(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return c10::BFloat16(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }

// ------------------------------------------------------------------ wmma
// Every lane holds the whole tile (as float: float16/bfloat16 values are exact in it); the
// collectives wait for the whole warp like the hardware's. A store writes only the lane's
// share of the tile (elements lane, lane + 32, ...), so other lanes see it after a __syncwarp.
namespace nvcuda {
namespace wmma {
struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  float x[rows * cols];  // row-major
};

namespace detail {
// mptr 256-bit aligned, ldm a multiple of 16 bytes (the CUDA programming guide's rules).
inline void check_matrix(const void* p, unsigned int ldm, size_t elem, const char* op) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    nat_mm::emulation::fail(std::string(op) + ": pointer " +
                            std::to_string(reinterpret_cast<uintptr_t>(p)) +
                            " not 32-byte aligned or ldm " + std::to_string(ldm) +
                            " not a multiple of 16 bytes");
  }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (float& e : f.x) e = static_cast<float>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned int ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads not emulated");
  using F = fragment<Use, M, N, K, T, L>;
  detail::check_matrix(p, ldm, sizeof(T), "load_matrix_sync");
  nat_mm::emulation::sync_warp(0xffffffffu, "wmma::load_matrix_sync");
  constexpr bool col = std::is_same<L, col_major>::value;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = static_cast<float>(col ? p[c * ldm + r] : p[r * ldm + c]);
    }
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f,
                       unsigned int ldm, layout_t layout) {
  detail::check_matrix(p, ldm, sizeof(float), "store_matrix_sync");
  nat_mm::emulation::sync_warp(0xffffffffu, "wmma::store_matrix_sync");
  for (int e = nat_mm::emulation::lane_id(); e < M * N; e += nat_mm::emulation::kWarpSize) {
    const int r = e / N, c = e % N;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[e];
  }
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  nat_mm::emulation::sync_warp(0xffffffffu, "wmma::mma_sync");
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * N + j];
      out[i * N + j] = s;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda
