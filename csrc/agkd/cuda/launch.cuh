// How the CUDA kernels are launched and find their dynamic shared memory. Every launch in
// cuda/*.cu goes through launch_kernel, so each one is checked, and so that the CPU
// emulation build (cuda_emu/emulation.h, AGKD_CUDA_EMULATION) can run the same sources:
// there, a launch runs the grid on the CPU instead of `<<<...>>>`.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstddef>
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
