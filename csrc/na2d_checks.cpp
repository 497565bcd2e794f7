#include "na2d_checks.h"

namespace nat_mm {

std::string message(std::initializer_list<std::string_view> parts) {
  std::string text;
  for (std::string_view part : parts) text.append(part);
  return text;
}

std::string message_int(int64_t value) { return std::to_string(value); }

std::string message_ints(at::IntArrayRef values) {
  std::string text = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    text += (i ? ", " : "") + std::to_string(values[i]);
  }
  return text + "]";
}

namespace {

// The checks run in the order of the Python checks (validation.py), so a call with two
// faults raises the same error type on every path: kernel_size before dilation, a tensor's
// dtype before its rank, a tensor's dtype against its reference before their devices.

void check_pair(at::IntArrayRef pair, const char* name) {
  NAT_MM_CHECK_TYPE(pair.size() == 2, "nat_mm: ", name, " must have 2 entries, got ",
                    message_ints(pair));
}

void check_window(at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  check_pair(kernel_size, "kernel_size");
  for (int a = 0; a < 2; ++a) {
    NAT_MM_CHECK_VALUE(kernel_size[a] >= 3 && kernel_size[a] % 2 == 1,
                       "nat_mm: kernel_size must be odd and >= 3 along each axis, got ",
                       message_ints(kernel_size));
  }
  check_pair(dilation, "dilation");
  for (int a = 0; a < 2; ++a) {
    NAT_MM_CHECK_VALUE(dilation[a] >= 1, "nat_mm: dilation must be >= 1 along each axis, got ",
                       message_ints(dilation));
  }
}

// A defined floating tensor of `rank` dimensions, laid out as `layout`.
void check_floating(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  NAT_MM_CHECK_TYPE(t.defined(), "nat_mm: ", name, " is undefined");
  const at::ScalarType type = t.scalar_type();
  NAT_MM_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                        type == at::kBFloat16,
                    "nat_mm: ", name, " must be float16, bfloat16, float32 or float64, got ",
                    c10::toString(type));
  NAT_MM_CHECK_VALUE(t.dim() == rank, "nat_mm: ", name, " must be ", message_int(rank), "-D ",
                     layout, ", got shape ", message_ints(t.sizes()));
}

// A map [batch, heads, height, width, C].
void check_5d(const at::Tensor& t, const char* name) {
  check_floating(t, name, 5, "[batch, heads, height, width, C]");
}

// t with ref's dtype on ref's device (the kernels read every input in one type).
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  NAT_MM_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "nat_mm: ", name, " has dtype ",
                    c10::toString(t.scalar_type()), " but ", ref_name, " has ",
                    c10::toString(ref.scalar_type()), ": cast them to one dtype");
  NAT_MM_CHECK_VALUE(t.device() == ref.device(), "nat_mm: ", name, " is on ",
                     t.device().str(), " but ", ref_name, " is on ", ref.device().str(),
                     ": move them to one device");
}

// A 5-D tensor with ref's device, dtype and shape.
void check_same_as(const at::Tensor& t, const char* name, const at::Tensor& ref,
                   const char* ref_name) {
  check_5d(t, name);
  check_like(t, name, ref, ref_name);
  NAT_MM_CHECK_VALUE(t.sizes() == ref.sizes(), "nat_mm: ", name, " must have the shape of ",
                     ref_name, " ", message_ints(ref.sizes()), ", got ",
                     message_ints(t.sizes()));
}

void check_map_size(const at::Tensor& t, at::IntArrayRef kernel_size,
                    at::IntArrayRef dilation) {
  NAT_MM_CHECK_VALUE(t.size(2) >= kernel_size[0] * dilation[0] &&
                         t.size(3) >= kernel_size[1] * dilation[1],
                     "nat_mm: the feature map (", message_int(t.size(2)), "x",
                     message_int(t.size(3)), ") is smaller than kernel_size*dilation (",
                     message_int(kernel_size[0] * dilation[0]), "x",
                     message_int(kernel_size[1] * dilation[1]), "): pad it");
}

void check_rpb(const std::optional<at::Tensor>& rpb, const at::Tensor& query,
               at::IntArrayRef kernel_size) {
  if (!is_given(rpb)) return;
  check_floating(*rpb, "rpb", 3, "[heads, 2*kernel_h-1, 2*kernel_w-1]");
  check_like(*rpb, "rpb", query, "query");
  NAT_MM_CHECK_VALUE(rpb->size(0) == query.size(1) &&
                         rpb->size(1) == 2 * kernel_size[0] - 1 &&
                         rpb->size(2) == 2 * kernel_size[1] - 1,
                     "nat_mm: rpb must have shape [heads, 2*kernel_h-1, 2*kernel_w-1] = ",
                     message_ints({query.size(1), 2 * kernel_size[0] - 1,
                                   2 * kernel_size[1] - 1}),
                     ", got ", message_ints(rpb->sizes()));
}

// A floating [batch, heads, height, width] tensor on query's device (lse, grad_lse).
void check_per_query(const at::Tensor& t, const char* name, const at::Tensor& query) {
  NAT_MM_CHECK_TYPE(t.defined() && at::isFloatingType(t.scalar_type()), "nat_mm: ", name,
                    " must be a floating tensor [batch, heads, height, width], got ",
                    t.defined() ? c10::toString(t.scalar_type()) : "an undefined tensor");
  NAT_MM_CHECK_VALUE(t.device() == query.device(), "nat_mm: ", name, " must be on ",
                     query.device().str(), ", the device of query");
  NAT_MM_CHECK_VALUE(t.sizes() == query.sizes().slice(0, 4), "nat_mm: ", name,
                     " must have shape [batch, heads, height, width] = ",
                     message_ints(query.sizes().slice(0, 4)), ", got ",
                     message_ints(t.sizes()));
}

}  // namespace

void check_qk_args(const at::Tensor& query, const at::Tensor& key,
                   const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
                   at::IntArrayRef dilation) {
  check_window(kernel_size, dilation);
  check_5d(query, "query");
  check_same_as(key, "key", query, "query");
  check_map_size(query, kernel_size, dilation);
  check_rpb(rpb, query, kernel_size);
}

void check_weights_args(const at::Tensor& weights, const char* weights_name,
                        const at::Tensor& source, const char* source_name,
                        at::IntArrayRef kernel_size, at::IntArrayRef dilation) {
  check_window(kernel_size, dilation);
  check_5d(source, source_name);
  check_5d(weights, weights_name);
  check_like(weights, weights_name, source, source_name);
  NAT_MM_CHECK_VALUE(weights.size(4) == kernel_size[0] * kernel_size[1], "nat_mm: ",
                     weights_name, " last dim must be kernel_h*kernel_w = ",
                     message_int(kernel_size[0] * kernel_size[1]), ", got ",
                     message_int(weights.size(4)));
  NAT_MM_CHECK_VALUE(weights.sizes().slice(0, 4) == source.sizes().slice(0, 4), "nat_mm: ",
                     weights_name, " and ", source_name,
                     " must agree in [batch, heads, height, width], got ",
                     message_ints(weights.sizes()), " and ", message_ints(source.sizes()));
  check_map_size(source, kernel_size, dilation);
}

void check_rpb_grad_args(const at::Tensor& grad_attn, at::IntArrayRef kernel_size,
                         at::IntArrayRef dilation) {
  check_window(kernel_size, dilation);
  check_5d(grad_attn, "grad_attn");
  NAT_MM_CHECK_VALUE(grad_attn.size(4) == kernel_size[0] * kernel_size[1],
                     "nat_mm: grad_attn last dim must be kernel_h*kernel_w = ",
                     message_int(kernel_size[0] * kernel_size[1]), ", got ",
                     message_int(grad_attn.size(4)));
  check_map_size(grad_attn, kernel_size, dilation);
}

void check_fused_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                      const std::optional<at::Tensor>& rpb, at::IntArrayRef kernel_size,
                      at::IntArrayRef dilation) {
  check_qk_args(query, key, rpb, kernel_size, dilation);
  check_same_as(value, "value", query, "query");
}

void check_fused_backward_args(const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value,
                               const std::optional<at::Tensor>& rpb, const at::Tensor& out,
                               const at::Tensor& lse, at::IntArrayRef kernel_size,
                               at::IntArrayRef dilation,
                               const std::optional<at::Tensor>& grad_lse) {
  check_fused_args(query, key, value, rpb, kernel_size, dilation);
  check_same_as(grad_out, "grad_out", query, "query");
  check_same_as(out, "out", query, "query");
  check_per_query(lse, "lse", query);
  if (is_given(grad_lse)) check_per_query(*grad_lse, "grad_lse", query);
}

}  // namespace nat_mm
