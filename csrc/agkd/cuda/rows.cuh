// What the row kernels over (N, K) logits share (cuda/kd_cuda.cu, cuda/logit_cuda.cu): a
// strided row reader, the device exp, and the block size for one block per row.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace agkd {

constexpr int kRowThreads = 512;  // the largest block of a one-block-per-row kernel

struct DeviceExp {
  __device__ __forceinline__ float operator()(float x) const { return expf(x); }
  __device__ __forceinline__ double operator()(double x) const { return exp(x); }
};

// (N, K) logits of any strides, read as acc_t.
template <typename scalar_t>
struct Logits {
  const scalar_t* data;
  int64_t sN, sK;
  __device__ __forceinline__ at::opmath_type<scalar_t> at(int64_t n, int64_t k) const {
    return static_cast<at::opmath_type<scalar_t>>(data[n * sN + k * sK]);
  }
};

template <typename scalar_t>
Logits<scalar_t> logits_of(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

// A power of two between 32 and kRowThreads, about one thread per four logits.
inline int row_threads(int64_t K) {
  int threads = 32;
  while (threads < kRowThreads && threads * 4 < K) threads *= 2;
  return threads;
}

}  // namespace agkd
