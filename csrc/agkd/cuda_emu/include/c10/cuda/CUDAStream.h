// Emulation shim for c10/cuda/CUDAStream.h (see agkd/cuda_emu/emulation.h): launches run
// synchronously, so every stream is the same null stream.
#pragma once

#include <c10/core/Device.h>

#include "agkd/cuda_emu/emulation.h"

namespace c10::cuda {

class CUDAStream {
 public:
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex /*device*/ = -1) { return {}; }

}  // namespace c10::cuda
