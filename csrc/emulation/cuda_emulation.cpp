// The execution model of the CUDA emulation (cuda_emulation.h): blocks one after another,
// the threads of a block as fibers (ucontext) on the calling OS thread, switched at barriers.
#include "cuda_emulation.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <vector>

// The dynamic shared memory (`extern __shared__ ... smem_raw[]` in the kernels): one
// buffer, as blocks run one at a time; a little past the opt-in limit so that a write past
// a launch's size is seen in the spare bytes rather than corrupting something else.
namespace nat_mm {
namespace cuda_detail {
constexpr size_t kSmemBufferBytes = emulation::kSmemOptin + 4096;
unsigned char smem_raw[kSmemBufferBytes] __attribute__((aligned(128)));
}  // namespace cuda_detail

namespace emulation {
namespace {

// What shared memory holds before a thread writes it: 0xFF bytes (NaN as float32, float16
// and bfloat16) by default; NAT_MM_EMULATION_POISON=huge gives 0x7F bytes (3.4e38 as
// float32 and bfloat16, NaN as float16), which max() picks where it would skip a NaN.
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

unsigned char poison_byte() { return env_is("NAT_MM_EMULATION_POISON", "huge") ? 0x7F : 0xFF; }
constexpr size_t kStackBytes = 256 * 1024;

enum class State { ready, block_barrier, warp_barrier, done };

struct Fiber {
  ucontext_t context;
  State state = State::ready;
  const char* op = nullptr;  // the warp call it waits in
  unsigned int tid = 0;
};

struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Launch {
  const std::function<void()>* body = nullptr;
  dim3 grid, block, block_index;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  std::string error;
  unsigned char exchange[kMaxThreads][8];
};

std::mutex launch_mutex;         // launches run one at a time
Launch* running = nullptr;       // the launch in progress
std::vector<char*> stack_pool;   // reused across launches
std::unordered_map<const void*, int> smem_optin;  // per kernel, cudaFuncSetAttribute
std::vector<std::string> launch_log;

// The kernel's name from the dynamic symbol table (template instantiations are there).
std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) == 0 || info.dli_saddr != kernel || info.dli_sname == nullptr) {
    return "?";
  }
  int status = 0;
  char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
  std::free(demangled);
  return name;
}

char* fiber_stack(size_t i) {
  while (stack_pool.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda emulation: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // an overflow faults instead of corrupting memory
    stack_pool.push_back(static_cast<char*>(p) + page);
  }
  return stack_pool[i];
}

Launch& launch() {
  if (running == nullptr || running->current == nullptr) {
    throw std::logic_error("cuda emulation: device code called outside a kernel");
  }
  return *running;
}

void fiber_main() {
  Launch& l = *running;
  try {
    (*l.body)();
  } catch (const std::exception& e) {
    if (l.error.empty()) l.error = e.what();
  } catch (...) {  // nothing may unwind past a fiber's first frame
    if (l.error.empty()) l.error = "a non-standard exception in device code";
  }
  l.current->state = State::done;
  swapcontext(&l.current->context, &l.scheduler);  // never resumed
}

void wait_at(State state, const char* op) {
  Launch& l = launch();
  Fiber* f = l.current;
  f->state = state;
  f->op = op;
  swapcontext(&f->context, &l.scheduler);
}

std::string warp_states(const Launch& l, unsigned int first, unsigned int end) {
  std::string s;
  for (unsigned int t = first; t < end; ++t) {
    const Fiber& f = l.fibers[t];
    s += " " + std::to_string(t) + ":";
    switch (f.state) {
      case State::ready:
        s += "running";
        break;
      case State::block_barrier:
        s += "__syncthreads";
        break;
      case State::warp_barrier:
        s += f.op;
        break;
      case State::done:
        s += "exited";
        break;
    }
  }
  return s;
}

// Releases the warps whose lanes all wait in one kind of warp call, or the block when every
// live thread waits in __syncthreads; false with l.error set when nothing can go on.
bool release_barriers(Launch& l) {
  const unsigned int n = l.block.x;
  bool released = false, all_at_block = true;
  for (unsigned int first = 0; first < n; first += kWarpSize) {
    const unsigned int end = std::min(n, first + kWarpSize);
    unsigned int waiting = 0, exited = 0;
    const char* op = nullptr;
    bool same_op = true;
    for (unsigned int t = first; t < end; ++t) {
      const Fiber& f = l.fibers[t];
      if (f.state == State::warp_barrier) {
        same_op = same_op && (op == nullptr || std::strcmp(op, f.op) == 0);
        op = f.op;
        ++waiting;
      }
      if (f.state == State::done) ++exited;
      if (f.state != State::done && f.state != State::block_barrier) all_at_block = false;
    }
    if (waiting == 0) continue;
    if (exited > 0 || !same_op) {
      l.error = "warp " + std::to_string(first / kWarpSize) +
              " waits in a warp call that not all its lanes reach:" +
              warp_states(l, first, end);
      return false;
    }
    if (waiting == end - first) {
      for (unsigned int t = first; t < end; ++t) l.fibers[t].state = State::ready;
      released = true;
    }
  }
  if (released) return true;
  if (all_at_block) {
    for (Fiber& f : l.fibers) {
      if (f.state == State::block_barrier) f.state = State::ready;
    }
    return true;
  }
  l.error = "deadlock: barriers diverge within the block:" + warp_states(l, 0, n);
  return false;
}

// One block; false with l.error set on an error.
bool run_block(Launch& l, size_t smem) {
  const unsigned int n = l.block.x;
  const unsigned char poison = poison_byte();
  std::memset(cuda_detail::smem_raw, poison, cuda_detail::kSmemBufferBytes);
  for (unsigned int t = 0; t < n; ++t) {
    Fiber& f = l.fibers[t];
    f.state = State::ready;
    f.tid = t;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = fiber_stack(t);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  const bool reverse = env_is("NAT_MM_EMULATION_ORDER", "reverse");
  for (;;) {
    for (unsigned int i = 0; i < n; ++i) {
      Fiber& f = l.fibers[reverse ? n - 1 - i : i];
      if (f.state != State::ready) continue;
      l.current = &f;
      swapcontext(&l.scheduler, &f.context);
      if (!l.error.empty()) return false;
    }
    bool all_done = true;
    for (const Fiber& f : l.fibers) all_done = all_done && f.state == State::done;
    if (all_done) break;
    if (!release_barriers(l)) return false;
  }
  for (size_t b = smem; b < cuda_detail::kSmemBufferBytes; ++b) {
    if (cuda_detail::smem_raw[b] != poison) {
      l.error = "write past the dynamic shared memory (" + std::to_string(smem) +
                " bytes) at byte " + std::to_string(b);
      return false;
    }
  }
  return true;
}

}  // namespace

void fail(const std::string& what) { throw KernelFault(what); }

dim3 thread_idx() { return dim3{launch().current->tid, 0, 0}; }
dim3 block_idx() { return launch().block_index; }
dim3 block_dim() { return launch().block; }
dim3 grid_dim() { return launch().grid; }
int lane_id() { return static_cast<int>(launch().current->tid % kWarpSize); }

void sync_threads() { wait_at(State::block_barrier, "__syncthreads"); }

void sync_warp(unsigned int mask, const char* op) {
  if (mask != 0xffffffffu) fail(std::string(op) + ": only the full warp mask is emulated");
  wait_at(State::warp_barrier, op);
}

void* warp_exchange_slot(int lane) {
  Launch& l = launch();
  const unsigned int warp_first = l.current->tid / kWarpSize * kWarpSize;
  const unsigned int t = warp_first + static_cast<unsigned int>(lane);
  if (t >= l.block.x) fail("shuffle from lane " + std::to_string(lane) + " past the block");
  return l.exchange[t];
}

void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  smem_optin[kernel] = bytes;
}

std::vector<std::string> take_launch_log() {
  std::lock_guard<std::mutex> lock(launch_mutex);
  std::vector<std::string> log;
  log.swap(launch_log);
  return log;
}

void run_grid(const void* kernel, unsigned int grid, int threads, size_t smem,
              const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  TORCH_CHECK(running == nullptr, "cuda emulation: a kernel launched from a kernel");
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads, "emulated launch: ", threads,
              " threads per block (1 to ", kMaxThreads, " allowed)");
  TORCH_CHECK(grid >= 1 && grid <= 0x7fffffffu, "emulated launch: grid of ", grid, " blocks");
  const auto optin = smem_optin.find(kernel);
  const size_t limit = optin == smem_optin.end() ? kSmemDefault : optin->second;
  TORCH_CHECK(smem <= limit, "emulated launch: ", smem, " bytes of dynamic shared memory, ",
              "more than the ", limit, " allowed for this kernel",
              optin == smem_optin.end() ? " (no cudaFuncSetAttribute opt-in)" : "");
  launch_log.push_back(kernel_name(kernel));
  Launch l;
  l.body = &body;
  l.grid = dim3{grid, 1, 1};
  l.block = dim3{static_cast<unsigned int>(threads), 1, 1};
  l.fibers.resize(static_cast<size_t>(threads));
  struct Running {  // cleared however the launch ends
    explicit Running(Launch* l) { running = l; }
    ~Running() { running = nullptr; }
  } guard(&l);
  bool ok = true;
  for (unsigned int b = 0; b < grid && ok; ++b) {
    l.block_index = dim3{b, 0, 0};
    ok = run_block(l, smem);
  }
  TORCH_CHECK(ok, "emulated kernel, block ", l.block_index.x, " of ", grid, ": ", l.error);
}

}  // namespace emulation
}  // namespace nat_mm
