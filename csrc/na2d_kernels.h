// Declarations of the per-device neighborhood-attention kernels. Each device defines the
// same six functions with its own suffix; csrc/register.cpp binds them to the schemas
// defined in nat_mm/ops/library.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace nat_mm {

#define NAT_MM_DECLARE_KERNELS(device)                                                      \
  at::Tensor na2d_qk_##device(const at::Tensor& query, const at::Tensor& key,               \
                              const std::optional<at::Tensor>& rpb,                         \
                              at::IntArrayRef kernel_size, at::IntArrayRef dilation);       \
  at::Tensor na2d_av_##device(const at::Tensor& attn, const at::Tensor& value,              \
                              at::IntArrayRef kernel_size, at::IntArrayRef dilation);       \
  at::Tensor na2d_inverse_##device(const at::Tensor& weights, const at::Tensor& source,     \
                                   at::IntArrayRef kernel_size, at::IntArrayRef dilation);  \
  at::Tensor na2d_rpb_grad_##device(const at::Tensor& grad_attn,                            \
                                    at::IntArrayRef kernel_size, at::IntArrayRef dilation); \
  std::tuple<at::Tensor, at::Tensor> na2d_fused_##device(                                   \
      const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,              \
      const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,                    \
      at::IntArrayRef dilation, double scale);                                              \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_fused_backward_##device(  \
      const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,           \
      const at::Tensor& value, const std::optional<at::Tensor>& rpb, const at::Tensor& out, \
      const at::Tensor& lse, at::IntArrayRef kernel_size, at::IntArrayRef dilation,         \
      double scale, const std::optional<at::Tensor>& grad_lse);

NAT_MM_DECLARE_KERNELS(cpu)
#ifdef NAT_MM_WITH_CUDA
NAT_MM_DECLARE_KERNELS(cuda)
#endif

#undef NAT_MM_DECLARE_KERNELS

}  // namespace nat_mm
