// The CUDA emulator's runtime (interface and scope in emulation.h): launch checks, the
// per-OS-thread block scheduler, fibers, and the few runtime API calls the kernels' host
// code makes.
#include "agkd/cuda_emu/emulation.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define AGKD_EMU_ASAN 1
#endif

#if !defined(__x86_64__) || defined(AGKD_EMU_UCONTEXT)
#include <ucontext.h>
#define AGKD_EMU_USE_UCONTEXT 1
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace agkd::cuda_emu {
namespace {

// ------------------------------------------------------------------ fibers

// 256 KiB each: a few KiB were found to be too small for the SSIM kernels' frames, and an
// overflow would silently corrupt the neighbouring stack, so each stack also sits above a
// guard page that turns an overflow into a crash.
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

#if !defined(AGKD_EMU_USE_UCONTEXT)
// A context switch saves the callee-saved registers and the SSE/x87 control words on the
// current stack, stores the stack pointer in *save and continues on `load` (System V
// x86-64). A new fiber's stack is laid out so that the first switch "returns" into
// agkd_emu_fiber_start, which calls r12(r13).
asm(R"(
  .text
  .p2align 4
  .globl agkd_emu_switch_context
  .hidden agkd_emu_switch_context
  .type agkd_emu_switch_context, @function
agkd_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size agkd_emu_switch_context, .-agkd_emu_switch_context

  .p2align 4
  .globl agkd_emu_fiber_start
  .hidden agkd_emu_fiber_start
  .type agkd_emu_fiber_start, @function
agkd_emu_fiber_start:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size agkd_emu_fiber_start, .-agkd_emu_fiber_start
)");
extern "C" void agkd_emu_switch_context(void** save, void* load);
extern "C" void agkd_emu_fiber_start();
#endif

struct Stack {
  unsigned char* mapping = nullptr;  // guard page, then the stack
  Stack() {
    void* p = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "CUDA emulator: cannot map a fiber stack");
    mapping = static_cast<unsigned char*>(p);
    TORCH_CHECK(mprotect(mapping, kGuardBytes, PROT_NONE) == 0,
                "CUDA emulator: cannot protect a fiber stack's guard page");
  }
  ~Stack() { munmap(mapping, kGuardBytes + kStackBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  unsigned char* bottom() const { return mapping + kGuardBytes; }
  unsigned char* top() const { return bottom() + kStackBytes; }
};

// A point of execution that can be left and resumed: the scheduler's own, or a fiber's.
struct Context {
#if defined(AGKD_EMU_USE_UCONTEXT)
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
};

void switch_context(Context& from, Context& to) {
#if defined(AGKD_EMU_USE_UCONTEXT)
  TORCH_CHECK(swapcontext(&from.uc, &to.uc) == 0, "CUDA emulator: swapcontext failed");
#else
  agkd_emu_switch_context(&from.sp, to.sp);
#endif
}

#if defined(AGKD_EMU_USE_UCONTEXT)
void fiber_entry_split(unsigned hi, unsigned lo);
#endif

// Prepares `context` to start `entry(arg)` on `stack` at its next switch.
void make_context(Context& context, const Stack& stack, void (*entry)(void*), void* arg) {
#if defined(AGKD_EMU_USE_UCONTEXT)
  TORCH_CHECK(getcontext(&context.uc) == 0, "CUDA emulator: getcontext failed");
  context.uc.uc_stack.ss_sp = stack.bottom();
  context.uc.uc_stack.ss_size = kStackBytes;
  context.uc.uc_link = nullptr;
  static_assert(sizeof(void*) == 8, "the ucontext fallback passes a pointer as two ints");
  const auto bits = reinterpret_cast<uintptr_t>(arg);
  (void)entry;  // the ucontext build always enters fiber_main
  makecontext(&context.uc, reinterpret_cast<void (*)()>(&fiber_entry_split), 2,
              static_cast<unsigned>(bits >> 32), static_cast<unsigned>(bits));
#else
  uint32_t mxcsr = 0;
  uint16_t fpu_control = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.top()) & ~uintptr_t{15});
  uint64_t* sp = top - 1;  // the return slot: after `ret` the stack is 16-byte aligned
  *sp = reinterpret_cast<uint64_t>(&agkd_emu_fiber_start);
  *--sp = 0;                                    // rbp
  *--sp = 0;                                    // rbx
  *--sp = reinterpret_cast<uint64_t>(entry);    // r12
  *--sp = reinterpret_cast<uint64_t>(arg);      // r13
  *--sp = 0;                                    // r14
  *--sp = 0;                                    // r15
  *--sp = uint64_t{mxcsr} | (uint64_t{fpu_control} << 32);
  context.sp = sp;
#endif
}

// ------------------------------------------------------------------ scheduler

enum class ThreadState { kRunnable, kAtBarrier, kDone };

struct Barrier {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Barrier& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
};

std::string describe(const Barrier& b) {
  const char* slash = std::strrchr(b.file, '/');
  return std::string(slash ? slash + 1 : b.file) + ":" + std::to_string(b.line);
}

struct Fiber {
  Context context;
  uint3 index{};
  ThreadState state = ThreadState::kRunnable;
  Barrier barrier;
  std::exception_ptr error;
};

enum class Order { kForward, kReverse, kShuffle };

Order order_from_environment() {
  const char* value = std::getenv("AGKD_CUDA_EMU_ORDER");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "forward") == 0) return Order::kForward;
  if (std::strcmp(value, "reverse") == 0) return Order::kReverse;
  if (std::strcmp(value, "shuffle") == 0) return Order::kShuffle;
  TORCH_CHECK(false, "AGKD_CUDA_EMU_ORDER must be forward, reverse or shuffle, got '", value, "'");
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// A fixed permutation per (seed), so a shuffled run is repeatable.
void arrange(std::vector<int>& order, Order mode, uint64_t seed) {
  std::iota(order.begin(), order.end(), 0);
  if (mode == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (mode == Order::kShuffle) {
    for (size_t i = order.size(); i > 1; --i) {
      seed = splitmix64(seed);
      std::swap(order[i - 1], order[seed % i]);
    }
  }
}

// Everything one OS thread needs to run blocks: the fibers and their stacks (kept from
// launch to launch), the dynamic shared memory of the block it runs, and who is running.
struct Worker {
  Context scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<Stack>> stacks;
  std::vector<int> order;
  std::vector<unsigned char> shared;  // dynamic shared memory, then the guard zone
  int current = -1;                   // index of the running fiber, -1 outside a block
  ThreadBody body = nullptr;
  const void* context = nullptr;
#if defined(AGKD_EMU_ASAN)
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

thread_local Worker worker;

constexpr size_t kSharedGuardBytes = 256;
constexpr unsigned char kSharedFill = 0xFF;  // NaN as float and double
constexpr unsigned char kGuardFill = 0xA5;

void fiber_main(void* /*unused*/) {
  Worker& w = worker;
#if defined(AGKD_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.scheduler_stack_bottom, &w.scheduler_stack_size);
#endif
  Fiber& self = w.fibers[w.current];
  try {
    w.body(w.context);
  } catch (...) {
    self.error = std::current_exception();
  }
  self.state = ThreadState::kDone;
#if defined(AGKD_EMU_ASAN)
  __sanitizer_start_switch_fiber(nullptr, w.scheduler_stack_bottom, w.scheduler_stack_size);
#endif
  switch_context(self.context, w.scheduler);
  __builtin_unreachable();  // a finished fiber is never resumed
}

#if defined(AGKD_EMU_USE_UCONTEXT)
void fiber_entry_split(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>((uintptr_t{hi} << 32) | lo));
}
#endif

void resume(Worker& w, int index) {
  Fiber& f = w.fibers[index];
  w.current = index;
  threadIdx = f.index;
#if defined(AGKD_EMU_ASAN)  // AddressSanitizer keeps per-stack state: tell it of every switch
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, w.stacks[index]->bottom(), kStackBytes);
#endif
  switch_context(w.scheduler, f.context);
#if defined(AGKD_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  w.current = -1;
}

[[noreturn]] void divergence(const std::string& what) {
  TORCH_CHECK(false, "divergent __syncthreads() in block (", blockIdx.x, ", ", blockIdx.y, ", ",
              blockIdx.z, "): ", what);
}

void run_block(Worker& w, unsigned threads, Order mode, uint64_t block_seed) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = w.fibers[t];
    f.index = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
    f.state = ThreadState::kRunnable;
    f.error = nullptr;
    make_context(f.context, *w.stacks[t], &fiber_main, nullptr);
  }
  for (uint64_t phase = 0;; ++phase) {
    arrange(w.order, mode, splitmix64(block_seed ^ (phase * 0x2545F4914F6CDD1Dull)));
    for (const int t : w.order) {
      if (w.fibers[t].state == ThreadState::kRunnable) resume(w, t);
    }
    unsigned waiting = 0;
    const Barrier* first = nullptr;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = w.fibers[t];
      if (f.error) std::rethrow_exception(f.error);
      if (f.state != ThreadState::kAtBarrier) continue;
      if (first == nullptr) {
        first = &f.barrier;
      } else if (!(f.barrier == *first)) {
        divergence("threads wait at " + describe(*first) + " and at " + describe(f.barrier));
      }
      ++waiting;
    }
    if (waiting == 0) return;  // every thread finished
    if (waiting != threads) {
      std::ostringstream what;
      what << waiting << " of " << threads << " threads wait at " << describe(*first)
           << ", the others have exited";
      divergence(what.str());
    }
    for (unsigned t = 0; t < threads; ++t) w.fibers[t].state = ThreadState::kRunnable;
  }
}

// ------------------------------------------------------------------ launch state

thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_message;

std::mutex attribute_mutex;
std::unordered_map<const void*, int>& max_dynamic_shared() {
  static std::unordered_map<const void*, int> table;
  return table;
}

cudaError_t fail(cudaError_t code, const std::string& message) {
  last_error = code;
  last_message = message;
  return code;
}

std::string str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// The checks a GPU makes before it runs a launch.
cudaError_t check_launch(const void* kernel, dim3 grid, dim3 block, size_t shared) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > kMaxBlockDimXY ||
      block.y > kMaxBlockDimXY || block.z > kMaxBlockDimZ || threads > kMaxThreadsPerBlock) {
    return fail(cudaErrorInvalidConfiguration,
                "invalid configuration argument: block " + str(block) + " (at most 1024 threads, "
                "1024 x 1024 x 64)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > kMaxGridDimX ||
      grid.y > kMaxGridDimYZ || grid.z > kMaxGridDimYZ) {
    return fail(cudaErrorInvalidConfiguration,
                "invalid configuration argument: grid " + str(grid) +
                    " (each at least 1; y and z at most 65535)");
  }
  size_t allowed = kDefaultDynamicSharedBytes;
  {
    std::lock_guard<std::mutex> lock(attribute_mutex);
    const auto it = max_dynamic_shared().find(kernel);
    if (it != max_dynamic_shared().end()) allowed = std::max<size_t>(allowed, it->second);
  }
  if (shared > allowed) {
    return fail(cudaErrorInvalidValue,
                "invalid argument: " + std::to_string(shared) + " bytes of dynamic shared memory, "
                "the kernel allows " + std::to_string(allowed) +
                " (raise it with cudaFuncSetAttribute up to " +
                std::to_string(kOptinDynamicSharedBytes) + ")");
  }
  return cudaSuccess;
}

}  // namespace

void sync_threads(const char* file, int line) {
  Worker& w = worker;
  TORCH_CHECK(w.current >= 0, "__syncthreads() called outside an emulated kernel");
  Fiber& f = w.fibers[w.current];
  f.state = ThreadState::kAtBarrier;
  f.barrier = {file, line};
#if defined(AGKD_EMU_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, w.scheduler_stack_bottom, w.scheduler_stack_size);
#endif
  switch_context(f.context, w.scheduler);
#if defined(AGKD_EMU_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, &w.scheduler_stack_bottom, &w.scheduler_stack_size);
#endif
}

unsigned char* dynamic_shared_memory() {
  TORCH_CHECK(worker.current >= 0, "dynamic shared memory used outside an emulated kernel");
  return worker.shared.data();
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kOptinDynamicSharedBytes) {
    return fail(cudaErrorInvalidValue,
                "invalid argument: cudaFuncAttributeMaxDynamicSharedMemorySize " +
                    std::to_string(bytes) + " is above the device's opt-in limit " +
                    std::to_string(kOptinDynamicSharedBytes));
  }
  std::lock_guard<std::mutex> lock(attribute_mutex);
  max_dynamic_shared()[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared, ThreadBody body,
                     const void* context) {
  if (const cudaError_t e = check_launch(kernel, grid, block, shared); e != cudaSuccess) return e;
  const Order mode = order_from_environment();
  const unsigned threads = block.x * block.y * block.z;
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  // Blocks go in the order of the threads' mode as well: forward, reverse, or a fixed
  // scramble i -> (a·i + c) mod blocks (a permutation when a is coprime to blocks).
  uint64_t a = 0x9E3779B1ull % static_cast<uint64_t>(blocks) | 1;
  while (std::gcd(a, static_cast<uint64_t>(blocks)) != 1) a += 2;
  const auto block_at = [&](int64_t i) -> int64_t {
    if (mode == Order::kReverse) return blocks - 1 - i;
    if (mode == Order::kShuffle) return static_cast<int64_t>((a * i + 12345) % blocks);
    return i;
  };
  std::string failure;
  std::mutex failure_mutex;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Worker& w = worker;
    TORCH_CHECK(w.current < 0, "CUDA emulator: a kernel launched another kernel");
    while (w.stacks.size() < threads) w.stacks.push_back(std::make_unique<Stack>());
    if (w.fibers.size() < threads) w.fibers.resize(threads);
    w.order.resize(threads);
    w.body = body;
    w.context = context;
    blockDim = block;
    gridDim = grid;
    try {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = block_at(i);
        blockIdx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (int64_t{grid.x} * grid.y))};
        w.shared.assign(shared + kSharedGuardBytes, kSharedFill);
        std::fill(w.shared.begin() + shared, w.shared.end(), kGuardFill);
        run_block(w, threads, mode, splitmix64(static_cast<uint64_t>(b)));
        size_t past = 0;  // how far past the end the block wrote
        for (size_t k = shared; k < w.shared.size(); ++k) {
          if (w.shared[k] != kGuardFill) past = k - shared + 1;
        }
        TORCH_CHECK(past == 0, "block (", blockIdx.x, ", ", blockIdx.y, ", ", blockIdx.z, ") wrote ",
                    past, " bytes past its ", shared, " bytes of dynamic shared memory");
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (failure.empty()) failure = e.what();
    }
  });
  if (!failure.empty()) return fail(cudaErrorLaunchFailure, "unspecified launch failure: " + failure);
  return cudaSuccess;
}

}  // namespace agkd::cuda_emu

// ------------------------------------------------------------------ runtime API

cudaError_t cudaGetLastError() {
  const cudaError_t e = agkd::cuda_emu::last_error;
  agkd::cuda_emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return agkd::cuda_emu::last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  if (error == cudaSuccess) return "no error";
  if (!agkd::cuda_emu::last_message.empty()) return agkd::cuda_emu::last_message.c_str();
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  using namespace agkd::cuda_emu;
  if (device != 0) return fail(cudaErrorInvalidValue, "invalid device ordinal");
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kDefaultDynamicSharedBytes; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kMultiprocessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kOptinDynamicSharedBytes; return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "device attribute " + std::to_string(int(attribute)) +
                                         " is not emulated");
}
