// How the CUDA kernels are launched and find their dynamic shared memory. Every launch in
// cuda/*.cu goes through launch_kernel, so each one is checked, and so that the CPU
// emulation build (cuda_emu/emulation.h, AGKD_CUDA_EMULATION) can run the same sources:
// there, a launch runs the grid on the CPU instead of `<<<...>>>`.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#if defined(AGKD_CUDA_EMULATION)
#include "agkd/cuda_emu/emulation.h"
#endif

namespace agkd {

// kernel<<<grid, block, shared_bytes, stream>>>(args...), then the launch check.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, Args&&... args) {
#if defined(AGKD_CUDA_EMULATION)
  cuda_emu::launch(kernel, grid, block, shared_bytes, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Flat (one thread per element) kernels: their block size, and a grid that a grid-stride
// loop (AGKD_GRID_STRIDE) stretches over any count.
constexpr int kFlatThreads = 256;

inline unsigned flat_blocks(int64_t count) {
  constexpr int64_t kMaxBlocks = 65535;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(kMaxBlocks, (count + kFlatThreads - 1) / kFlatThreads)));
}

#define AGKD_GRID_STRIDE(i, count)                                             \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (count); \
       i += int64_t(gridDim.x) * blockDim.x)

// The block's dynamic shared memory (the launch's shared_bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#if defined(AGKD_CUDA_EMULATION)
  return reinterpret_cast<T*>(cuda_emu::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char agkd_dynamic_shared[];
  return reinterpret_cast<T*>(agkd_dynamic_shared);
#endif
}

}  // namespace agkd
