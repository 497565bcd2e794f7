// The emulated CUDA kernels as the operators nat_mm_emulated::<op> (CPU tensors in, CPU
// tensors out): the same entry points that csrc/register.cpp binds to the CUDA dispatch
// key, here run by the CPU emulation of csrc/emulation/cuda_emulation.h, for the schemas
// of nat_mm/ops/library.py (tests/cuda_emulation.py defines them in this namespace). A
// test library only (tests/cuda_emulation.py builds it); nat_mm itself never loads it.
#include <torch/library.h>

#include "emulation/cuda_emulation.h"
#include "na2d_kernels.h"

namespace nat_mm {
namespace cuda_detail {
at::Tensor emulation_selftest(c10::string_view name);  // emulation_selftest.cpp
}
}  // namespace nat_mm

TORCH_LIBRARY_IMPL(nat_mm_emulated, CPU, m) {
  m.impl("na2d_qk", &nat_mm::na2d_qk_cuda);
  m.impl("na2d_av", &nat_mm::na2d_av_cuda);
  m.impl("na2d_inverse", &nat_mm::na2d_inverse_cuda);
  m.impl("na2d_rpb_grad", &nat_mm::na2d_rpb_grad_cuda);
  m.impl("na2d_fused", &nat_mm::na2d_fused_cuda);
  m.impl("na2d_fused_backward", &nat_mm::na2d_fused_backward_cuda);
}

TORCH_LIBRARY_FRAGMENT(nat_mm_emulated, m) {
  m.def("selftest(str name) -> Tensor", &nat_mm::cuda_detail::emulation_selftest);
  m.def("launched_kernels() -> str[]", &nat_mm::emulation::take_launch_log);
}
