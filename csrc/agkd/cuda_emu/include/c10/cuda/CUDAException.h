// Emulation shim for c10/cuda/CUDAException.h (see agkd/cuda_emu/emulation.h): the same
// two checks, reading the emulated runtime's error state.
#pragma once

#include <c10/util/Exception.h>

#include <string>

#include "agkd/cuda_emu/emulation.h"

// Like c10's, a failed check clears the error it reports, so it is not reported again by
// the next launch check.
#define C10_CUDA_CHECK(EXPR)                                                      \
  do {                                                                            \
    const cudaError_t agkd_emu_error = (EXPR);                                    \
    if (agkd_emu_error != cudaSuccess) {                                          \
      const std::string agkd_emu_message = cudaGetErrorString(agkd_emu_error);    \
      (void)cudaGetLastError();                                                   \
      TORCH_CHECK(false, "CUDA error (emulated): ", agkd_emu_message);            \
    }                                                                             \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
