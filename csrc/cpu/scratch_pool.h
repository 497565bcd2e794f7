// Reused scratch memory for the CPU kernels' temporaries (transposed operand copies,
// dtype conversions) and outputs.
//
// Why: a fresh tensor of tens of MB is a fresh mmap from glibc, and first-touching it costs
// a page fault per 4 KiB page (measured: ~20% of the fused backward and ~25% of the fused
// forward at NAT-T detection stage 1 on 2 cores). The pool keeps freed blocks and hands
// them out again, like the CUDA caching allocator. Only blocks of 32 MiB and more are
// pooled (NAT_MM_CPU_SCRATCH_MIN_MB; see scratch_pool.cpp). Tensors from scratch_empty() are
// ordinary tensors (resizable storage with the pool's allocator); their block returns to
// the pool when the last reference dies. The ops also return their outputs (and gradients)
// in pool memory, so a training step reuses the previous step's blocks.
// Cached bytes are capped (NAT_MM_CPU_SCRATCH_MB, default 1024; 0 disables the pool) and
// release_scratch() frees every cached block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace nat_mm {

// An uninitialized contiguous tensor whose memory comes from the pool.
at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block; returns the bytes freed.
int64_t release_scratch();

// Bytes cached now (free blocks) and handed out.
struct ScratchStats {
  int64_t cached_bytes, in_use_bytes;
};
ScratchStats scratch_stats();

}  // namespace nat_mm
