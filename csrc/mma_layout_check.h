// Host walk of the tensor-core tiles' layout (see mma_layout_check.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace nat_mm {

// [height, width, kh*kw] int64: the flat key index (row * width + column) that neighbor
// (m, n) of each query reads in the tensor-core kernels' staged halo.
at::Tensor mma_neighbor_keys(int64_t height, int64_t width, int64_t kh, int64_t kw,
                             int64_t dh, int64_t dw);

// [height, width, kh*kw] int64: the key whose gather in the key-side tensor-core kernel
// covers neighbor (m, n) of each query (-1 where none does).
at::Tensor mma_key_side_pairs(int64_t height, int64_t width, int64_t kh, int64_t kw,
                              int64_t dh, int64_t dw);

}  // namespace nat_mm
