// A CPU emulation of the slice of CUDA that the kernels in csrc/agkd/cuda use, so that
// the unmodified .cu sources compile with g++ and run on CPU tensors in tests.
//
// This header is included first in every emulated translation unit (setup.py wraps each
// cuda/*.cu in a small .cpp that includes it), ahead of torch and of the shim headers in
// cuda_emu/include/c10/cuda. What it models:
//   * a block's threads are fibers on one OS thread; __syncthreads() is a counting barrier
//     that reports divergence (threads that exited, or waited at another barrier) as an
//     error, where a GPU would hang or misbehave silently;
//   * the threads run between barriers in forward, reverse or shuffled order
//     (AGKD_CUDA_EMU_ORDER), so a missing barrier shows up as results that depend on it;
//   * static __shared__ arrays are thread_local (blocks run one at a time per OS thread);
//     dynamic shared memory is a per-block buffer filled with NaN bytes and followed by a
//     guard zone that is checked after the block;
//   * launch limits of an sm_80 device are enforced, and a violation is a launch error
//     that the launch check reports, as on a GPU.
// Not modelled: warps (no __shfl_*/__syncwarp), streams (launches are synchronous),
// the GPU memory model and timing. CUDA's math library is the host's.
#pragma once

#if defined(__CUDACC__)
#error "agkd/cuda_emu/emulation.h is for host compilers; nvcc builds the real kernels"
#endif

#include <math.h>  // float overloads of sqrt, exp, ... in the global namespace, as CUDA has

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include <torch/library.h>

// ------------------------------------------------------------------ CUDA keywords

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Blocks run one at a time per OS thread, each block's threads on that OS thread, so
// thread-local storage is exactly "shared by the threads of this block".
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() ::agkd::cuda_emu::sync_threads(__FILE__, __LINE__)

// The .cu files register their kernels for the CUDA dispatch key; the emulated build
// registers the same functions for CPU tensors instead (and is loaded instead of the CPU
// kernels, see agkd_ops/_backend.py).
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, CPU, m, C10_UID)

// ------------------------------------------------------------------ runtime types

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// The current fiber's coordinates; the scheduler sets them before it resumes a thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace agkd::cuda_emu {

// The sm_80 limits the launcher enforces.
inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr unsigned kMaxBlockDimXY = 1024;
inline constexpr unsigned kMaxBlockDimZ = 64;
inline constexpr unsigned kMaxGridDimX = 2147483647u;
inline constexpr unsigned kMaxGridDimYZ = 65535;
inline constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;
inline constexpr size_t kOptinDynamicSharedBytes = 163 * 1024;
inline constexpr int kMultiprocessors = 108;

void sync_threads(const char* file, int line);
unsigned char* dynamic_shared_memory();

// Runs `body(context)` once per thread of every block; returns a launch error (and
// records its message for cudaGetErrorString) instead of running an invalid launch.
using ThreadBody = void (*)(const void* context);
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                     ThreadBody body, const void* context);

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);

// kernel<<<grid, block, shared_bytes, stream>>>(args...), synchronously.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t /*stream*/, Args&&... args) {
  // Like CUDA, the arguments are converted to the parameter types once per launch; each
  // thread then receives its own copy.
  using ParamTuple = std::tuple<std::decay_t<Params>...>;
  const ParamTuple params(std::forward<Args>(args)...);
  struct Context {
    void (*kernel)(Params...);
    const ParamTuple* params;
  } const context{kernel, &params};
  const ThreadBody body = [](const void* c) {
    const auto* ctx = static_cast<const Context*>(c);
    std::apply(ctx->kernel, *ctx->params);
  };
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes, body,
                  &context);
}

}  // namespace agkd::cuda_emu

// ------------------------------------------------------------------ runtime API

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute,
                                 int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return agkd::cuda_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}
