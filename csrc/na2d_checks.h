// Argument checks of the six neighborhood-attention ops, one set for every device's
// kernels. The Python layer validates first (with friendlier messages); these make a
// call that bypasses it (torch.ops.nat_mm.*, C++) raise a c10::Error instead of reading
// out of bounds. Defined in na2d_checks.cpp, compiled once by the host compiler: the CUDA
// translation units only call them.
//
// Messages are text only, joined into one std::string (NAT_MM_CHECK), with numbers made
// text by std::to_string (message_int/message_ints): on the lent H200 machine (torch 2.11,
// the image's own g++ in /opt/gcc), every check of this extension whose message streamed an
// integer or a shape killed the process with a segfault, from the CPU-compiled code as well
// as from nvcc's, while messages of strings only (dtype and device names) raised normally.
// c10 passes a single std::string message through as is, so no iostream code compiled into
// this module runs on the error path, and a number cannot be streamed by mistake (it does
// not convert to a string_view: a compile error).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

namespace nat_mm {

// The message pieces joined; NAT_MM_CHECK(cond, "text", name, message_int(n), ...) raises
// c10::Error with it when cond is false (the pieces are built only then). The argument
// checks raise what the Python checks raise for the same fault (validation.py), so a call
// fails with one error type whichever kernel serves it: NAT_MM_CHECK_TYPE (a wrong dtype or
// argument structure) gives Python a TypeError, NAT_MM_CHECK_VALUE (a wrong shape, value or
// device) a ValueError.
std::string message(std::initializer_list<std::string_view> parts);
#define NAT_MM_CHECK(cond, ...) TORCH_CHECK((cond), ::nat_mm::message({__VA_ARGS__}))
#define NAT_MM_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE((cond), ::nat_mm::message({__VA_ARGS__}))
#define NAT_MM_CHECK_VALUE(cond, ...) \
  TORCH_CHECK_VALUE((cond), ::nat_mm::message({__VA_ARGS__}))

// Message text of a number / of a shape, e.g. "[1, 2, 9, 9, 8]".
std::string message_int(int64_t value);
std::string message_ints(at::IntArrayRef values);

// query [B, heads, H, W, D], key like query, rpb [heads, 2kh-1, 2kw-1] or none.
void check_qk_args(const at::Tensor& query, const at::Tensor& key,
                   const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
                   at::IntArrayRef dilation);

// A [B, heads, H, W, kh*kw] weight map over a [B, heads, H, W, C] source (av: attn over
// value; inverse: weights over source).
void check_weights_args(const at::Tensor& weights, const char* weights_name,
                        const at::Tensor& source, const char* source_name,
                        at::IntArrayRef kernel_size, at::IntArrayRef dilation);

// grad_attn [B, heads, H, W, kh*kw].
void check_rpb_grad_args(const at::Tensor& grad_attn, at::IntArrayRef kernel_size,
                         at::IntArrayRef dilation);

// query, key, value of one shape [B, heads, H, W, D], rpb as for qk.
void check_fused_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                      const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
                      at::IntArrayRef dilation);

// As the forward, plus grad_out and out of query's shape, lse [B, heads, H, W] and
// grad_lse (optional) like lse.
void check_fused_backward_args(const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value,
                               const std::optional<at::Tensor>& rpb, const at::Tensor& out,
                               const at::Tensor& lse, at::IntArrayRef kernel_size,
                               at::IntArrayRef dilation,
                               const std::optional<at::Tensor>& grad_lse);

inline bool is_given(const std::optional<at::Tensor>& t) {  // rpb, grad_lse
  return t.has_value() && t->defined();
}

}  // namespace nat_mm
