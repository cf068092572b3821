// Kernels that break CUDA's rules on purpose, so that tests/test_cuda_emulator.py can check
// that the emulator reports each break instead of running it quietly: a divergent barrier,
// a missing barrier, a write past dynamic shared memory, and launches beyond the device's
// limits. Built only into the emulation extension, as agkd_cuda_emu::selftest.
#include "agkd/cuda_emu/emulation.h"

#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <string>

#include "agkd/cuda/launch.cuh"

namespace agkd {
namespace {

constexpr int kThreads = 64;

__global__ void noop_kernel(int* /*out*/) {}

// Half the block waits at a barrier the other half never reaches.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < kThreads / 2) __syncthreads();
  out[threadIdx.x] = 1;
}

// Each thread reads what its mirror thread wrote: right only with the barrier.
template <bool kBarrier>
__global__ void mirror_kernel(int* out, int salt) {
  __shared__ int values[kThreads];
  values[threadIdx.x] = static_cast<int>(threadIdx.x) + salt;
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = values[kThreads - 1 - threadIdx.x];
}

// Writes one int past the dynamic shared memory it was launched with.
__global__ void shared_overflow_kernel(int* out) {
  int* shared = dynamic_shared_memory<int>();
  shared[blockDim.x] = 1;
  out[threadIdx.x] = 0;
}

at::Tensor selftest(c10::string_view name) {
  static int salt = 0;
  at::Tensor out = at::full({kThreads}, -1, at::kInt);
  int* o = out.mutable_data_ptr<int>();
  const std::string which(name);
  if (which == "divergent_barrier") {
    launch_kernel(divergent_barrier_kernel, 1, kThreads, 0, nullptr, o);
  } else if (which == "mirror_with_barrier") {
    launch_kernel(mirror_kernel<true>, 1, kThreads, 0, nullptr, o, ++salt * 1000);
  } else if (which == "mirror_without_barrier") {
    launch_kernel(mirror_kernel<false>, 1, kThreads, 0, nullptr, o, ++salt * 1000);
  } else if (which == "shared_overflow") {
    launch_kernel(shared_overflow_kernel, 1, 32, 32 * sizeof(int), nullptr, o);
  } else if (which == "too_many_threads") {
    launch_kernel(noop_kernel, 1, 2048, 0, nullptr, o);
  } else if (which == "grid_y_too_large") {
    launch_kernel(noop_kernel, dim3(1, 65536), 32, 0, nullptr, o);
  } else if (which == "empty_grid") {
    launch_kernel(noop_kernel, 0, 32, 0, nullptr, o);
  } else if (which == "shared_without_opt_in") {
    launch_kernel(noop_kernel, 1, 32, 64 * 1024, nullptr, o);
  } else if (which == "shared_with_opt_in") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
    launch_kernel(noop_kernel, 1, 32, 100 * 1024, nullptr, o);
  } else if (which == "opt_in_above_the_device_limit") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  } else {
    TORCH_CHECK(false, "agkd_cuda_emu::selftest: unknown case '", which, "'");
  }
  return out;
}

}  // namespace
}  // namespace agkd

TORCH_LIBRARY(agkd_cuda_emu, m) {
  m.def("selftest(str name) -> Tensor", &agkd::selftest);
}
