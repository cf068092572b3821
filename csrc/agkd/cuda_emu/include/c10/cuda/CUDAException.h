// Emulation shim for c10/cuda/CUDAException.h (see agkd/cuda_emu/emulation.h): the same
// two checks, reading the emulated runtime's error state.
#pragma once

#include <c10/util/Exception.h>

#include "agkd/cuda_emu/emulation.h"

#define C10_CUDA_CHECK(EXPR)                                                      \
  do {                                                                            \
    const cudaError_t agkd_emu_error = (EXPR);                                    \
    TORCH_CHECK(agkd_emu_error == cudaSuccess, "CUDA error (emulated): ",          \
                cudaGetErrorString(agkd_emu_error));                              \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
