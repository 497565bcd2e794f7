// The one registration of the compiled kernels: CPU (and CUDA when built with it) for the
// schemas that nat_mm/ops/library.py defines, plus a small Python module for build info.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/scratch_pool.h"
#include "mma_layout_check.h"
#include "na2d_kernels.h"

#define NAT_MM_REGISTER_KERNELS(m, device)                          \
  m.impl("na2d_qk", &nat_mm::na2d_qk_##device);                     \
  m.impl("na2d_av", &nat_mm::na2d_av_##device);                     \
  m.impl("na2d_inverse", &nat_mm::na2d_inverse_##device);           \
  m.impl("na2d_rpb_grad", &nat_mm::na2d_rpb_grad_##device);         \
  m.impl("na2d_fused", &nat_mm::na2d_fused_##device);               \
  m.impl("na2d_fused_backward", &nat_mm::na2d_fused_backward_##device)

TORCH_LIBRARY_IMPL(nat_mm, CPU, m) { NAT_MM_REGISTER_KERNELS(m, cpu); }

#ifdef NAT_MM_WITH_CUDA
TORCH_LIBRARY_IMPL(nat_mm, CUDA, m) { NAT_MM_REGISTER_KERNELS(m, cuda); }
#endif

namespace nat_mm {
const char* cpu_capability();  // defined by the CPU kernels' translation unit
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("build_info", []() {
    pybind11::dict info;
#ifdef NAT_MM_WITH_CUDA
    info["cuda_kernels"] = true;
#else
    info["cuda_kernels"] = false;
#endif
    info["cpu_vector_isa"] = nat_mm::cpu_capability();
    return info;
  });
  module.def("release_cpu_scratch", &nat_mm::release_scratch,
             "Free the CPU kernels' cached scratch blocks; returns the bytes freed.");
  module.def("mma_neighbor_keys", &nat_mm::mma_neighbor_keys,
             "Key each neighbor of each query reads in the tensor-core kernels' staged halo "
             "(host walk of their layout, for tests).");
  module.def("mma_key_side_pairs", &nat_mm::mma_key_side_pairs,
             "Key whose key-side tensor-core gather covers each (query, neighbor) pair "
             "(host walk of their layout, for tests).");
  module.def("cpu_scratch_stats", []() {
    const nat_mm::ScratchStats s = nat_mm::scratch_stats();
    pybind11::dict d;
    d["cached_bytes"] = s.cached_bytes;
    d["in_use_bytes"] = s.in_use_bytes;
    return d;
  });
}
