// Small kernels that show what the CUDA emulation does with correct and with faulty device
// code (tests/test_cuda_emulation.py checks each): selftest(name) runs one and returns its
// output, or raises the emulator's error.
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>
#include <c10/util/string_view.h>

#include "cuda_emulation.h"

// In cuda_detail itself (not a nested namespace): the kernels' `extern __shared__` arrays
// must name the emulation's buffer, nat_mm::cuda_detail::smem_raw.
namespace nat_mm {
namespace cuda_detail {

using emulation::launch_kernel;

static __global__ void warp_sum_kernel(float* out) {
  float x = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  out[threadIdx.x] = x;
}

// out[0] = A . B with B read column-major, out[1] with B read row-major (A, B 16 x 16).
static __global__ void wmma_kernel(const c10::Half* a, const c10::Half* b, float* out) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, c10::Half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, c10::Half, wmma::col_major> fb_col;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, c10::Half, wmma::row_major> fb_row;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb_col, b, 16);
  wmma::load_matrix_sync(fb_row, b, 16);
  wmma::fill_fragment(acc, 0.f);
  wmma::mma_sync(acc, fa, fb_col, acc);
  wmma::store_matrix_sync(out, acc, 16, wmma::mem_row_major);
  wmma::fill_fragment(acc, 0.f);
  wmma::mma_sync(acc, fa, fb_row, acc);
  wmma::store_matrix_sync(out + 256, acc, 16, wmma::mem_row_major);
}

// Even threads write their slot; every thread reads its own back after the barrier.
static __global__ void uninitialized_shared_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x % 2 == 0) s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Each lane reads its neighbour's slot, with or without the __syncwarp it needs.
static __global__ void neighbour_read_kernel(float* out, bool sync) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncwarp();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 32];
}

static __global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1.f;
}

static __global__ void exited_lane_shuffle_kernel(float* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

static __global__ void shared_bytes_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  smem_raw[threadIdx.x] = 0;
  out[threadIdx.x] = 1.f;
}

static __global__ void misaligned_vector_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  *reinterpret_cast<uint4*>(smem_raw + 8) = make_uint4(0u, 0u, 0u, 0u);
  out[threadIdx.x] = 1.f;
}

static __global__ void misaligned_wmma_kernel(const c10::Half* a, float* out) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, c10::Half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + 8, 16);  // 16 bytes in: not 32-byte aligned
  out[threadIdx.x] = 1.f;
}

static __global__ void write_past_shared_kernel(float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  smem_raw[1024 + threadIdx.x] = 0;  // launched with 1024 bytes
  out[threadIdx.x] = 1.f;
}

// Reads one element past its input (a fault only AddressSanitizer sees: the memory there
// is usually readable).
static __global__ void read_past_input_kernel(const float* in, int64_t n, float* out) {
  out[threadIdx.x] = in[n - 1 + threadIdx.x];
}

static at::Tensor floats(int64_t n) { return at::zeros({n}, at::kFloat); }

at::Tensor emulation_selftest(c10::string_view name) {
  const cudaStream_t stream = nullptr;
  if (name == "warp_sum") {
    at::Tensor out = floats(64);
    launch_kernel(warp_sum_kernel, 1, 64, 0, stream, out.mutable_data_ptr<float>());
    return out;
  }
  if (name == "wmma") {
    at::Tensor a = at::arange(256, at::kFloat).remainder_(7).sub_(3).to(at::kHalf);
    at::Tensor b = at::arange(256, at::kFloat).remainder_(5).sub_(2).to(at::kHalf);
    at::Tensor out = floats(512);
    launch_kernel(wmma_kernel, 1, 32, 0, stream, a.const_data_ptr<c10::Half>(),
                  b.const_data_ptr<c10::Half>(), out.mutable_data_ptr<float>());
    return at::cat({a.to(at::kFloat), b.to(at::kFloat), out});
  }
  if (name == "uninitialized_shared") {
    at::Tensor out = floats(64);
    launch_kernel(uninitialized_shared_kernel, 1, 64, 256, stream, out.mutable_data_ptr<float>());
    return out;
  }
  if (name == "neighbour_read_synced" || name == "neighbour_read_unsynced") {
    at::Tensor out = floats(32);
    launch_kernel(neighbour_read_kernel, 1, 32, 128, stream, out.mutable_data_ptr<float>(),
                  name == "neighbour_read_synced");
    return out;
  }
  at::Tensor out = floats(64);
  float* o = out.mutable_data_ptr<float>();
  if (name == "divergent_barrier") {
    launch_kernel(divergent_barrier_kernel, 1, 32, 0, stream, o);
  } else if (name == "exited_lane_shuffle") {
    launch_kernel(exited_lane_shuffle_kernel, 1, 32, 0, stream, o);
  } else if (name == "shared_memory_limit") {  // 64 KiB without the opt-in
    launch_kernel(shared_bytes_kernel, 1, 32, 64 * 1024, stream, o);
  } else if (name == "shared_memory_optin") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(shared_bytes_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    launch_kernel(shared_bytes_kernel, 1, 32, 64 * 1024, stream, o);
  } else if (name == "misaligned_vector") {
    launch_kernel(misaligned_vector_kernel, 1, 32, 64, stream, o);
  } else if (name == "misaligned_wmma") {
    at::Tensor a = at::zeros({512}, at::kHalf);
    launch_kernel(misaligned_wmma_kernel, 1, 32, 0, stream, a.const_data_ptr<c10::Half>(), o);
  } else if (name == "read_past_input") {  // for the AddressSanitizer build only
    at::Tensor in = floats(8);
    launch_kernel(read_past_input_kernel, 1, 2, 0, stream, in.const_data_ptr<float>(),
                  in.numel(), o);
  } else if (name == "write_past_shared") {
    launch_kernel(write_past_shared_kernel, 1, 32, 1024, stream, o);
  } else {
    TORCH_CHECK(false, "emulation selftest: no case named '", std::string(name), "'");
  }
  return out;
}

}  // namespace cuda_detail
}  // namespace nat_mm
