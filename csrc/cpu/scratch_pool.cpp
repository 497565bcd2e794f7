// See scratch_pool.h.
#include "scratch_pool.h"

#include "na2d_checks.h"  // NAT_MM_CHECK, message_int

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>

namespace nat_mm {
namespace {

constexpr size_t kAlignment = 64;  // one cache line; at::vec loads are unaligned anyway
// Blocks from this size on are pooled (NAT_MM_CPU_SCRATCH_MIN_MB). glibc serves blocks
// above its mmap threshold (adaptive, at most 32 MiB on 64-bit) with a fresh mmap every
// time: those are the blocks worth keeping. Pooling from 4 MiB made the ops alone faster
// (fused backward at detection stage 1: 84 -> 62 ms, the 4-20 MB copies and outputs stopped
// page-faulting) but a whole NAT-Tiny training step slower (1460 -> 1662 ms, A/B): every
// other allocation of those sizes in the process kept its fresh mmap (see below).
constexpr int64_t kDefaultMinPooledMB = 32;

int64_t env_mb(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && env[0] != '\0' ? std::stoll(env) : fallback;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: deleters may run at exit
    return *pool;
  }

  void* acquire(size_t bytes, size_t* granted) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Best fit among free blocks that are not more than twice too large.
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t have = free_[i].bytes;
        if (have >= bytes && have <= 2 * bytes + (1 << 20) &&
            (best == free_.size() || have < free_[best].bytes)) {
          best = i;
        }
      }
      if (best != free_.size()) {
        Block b = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= b.bytes;
        in_use_ += b.bytes;
        *granted = b.bytes;
        return b.ptr;
      }
    }
    const size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    void* ptr = std::aligned_alloc(kAlignment, rounded > 0 ? rounded : kAlignment);
    NAT_MM_CHECK(ptr != nullptr, "nat_mm: out of memory allocating ",
                 message_int(static_cast<int64_t>(rounded)), " bytes of CPU scratch");
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ += rounded;
    *granted = rounded;
    return ptr;
  }

  void release(void* ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ -= bytes;
    if (static_cast<int64_t>(cached_ + bytes) > limit_) {
      std::free(ptr);
      return;
    }
    free_.push_back({ptr, bytes});
    cached_ += bytes;
  }

  int64_t release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t freed = 0;
    for (const Block& b : free_) {
      std::free(b.ptr);
      freed += static_cast<int64_t>(b.bytes);
    }
    free_.clear();
    cached_ = 0;
    return freed;
  }

  ScratchStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(in_use_)};
  }

  // Whether a block of this size is pooled.
  bool pools(size_t bytes) const { return limit_ > 0 && bytes >= min_bytes_; }

 private:
  Pool() {
    const int64_t mb = env_mb("NAT_MM_CPU_SCRATCH_MB", 1024);
    limit_ = mb > 0 ? mb << 20 : 0;
    min_bytes_ = static_cast<size_t>(std::max<int64_t>(0, env_mb("NAT_MM_CPU_SCRATCH_MIN_MB",
                                                                 kDefaultMinPooledMB)))
                 << 20;
  }

  std::mutex mutex_;
  std::vector<Block> free_;
  size_t cached_ = 0, in_use_ = 0, min_bytes_ = 0;
  int64_t limit_ = 0;
};

// A c10::Allocator over the pool, so that pool tensors have ordinary resizable storages.
class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    size_t granted = 0;
    void* ptr = Pool::instance().acquire(bytes, &granted);
    auto* context = new Grant{ptr, granted};
    return {ptr, context, &give_back, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Grant {
    void* ptr;
    size_t bytes;
  };
  static void give_back(void* context) {
    auto* grant = static_cast<Grant*>(context);
    Pool::instance().release(grant->ptr, grant->bytes);
    delete grant;
  }
};

PoolAllocator& pool_allocator() {
  static PoolAllocator* allocator = new PoolAllocator();
  return *allocator;
}

}  // namespace

at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  // Small blocks go to glibc: holding every size here would stop its mmap-threshold
  // adaptation for every other allocation of the process (measured: a NAT-Tiny training
  // step 12% slower when all sizes were pooled).
  if (!Pool::instance().pools(bytes)) return at::empty(sizes, options);
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, &pool_allocator(),
                       /*resizable=*/true);
  return at::empty({0}, options.device(c10::kCPU)).set_(storage, 0, sizes);
}

int64_t release_scratch() { return Pool::instance().release_all(); }

ScratchStats scratch_stats() { return Pool::instance().stats(); }

}  // namespace nat_mm
