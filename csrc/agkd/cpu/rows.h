// What the CPU kernels of the logit ops (cpu/kd_cpu.cpp, cpu/logit_cpu.cpp) share: rows of
// (N, K) logits handed out as contiguous accumulate-dtype memory, their maximum, and the
// vectorisable exp of the shared math.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "agkd/cpu/vectorize.h"

namespace agkd {

// The exp of the shared math (math/kd.h), in its vectorisable CPU form.
struct SimdExp {
  template <typename T>
  AGKD_CPU_INLINE T operator()(T x) const { return exp_simd(x); }
};

// (N, K) logits of any strides and dtype, handed out one row at a time as contiguous
// acc_t: the tensor's own memory where it already is that, else a converted copy.
template <typename scalar_t>
struct LogitRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* data;
  int64_t sN, sK, K;
  explicit LogitRows(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), sN(t.stride(0)), sK(t.stride(1)), K(t.size(1)) {}
  const acc_t* row(int64_t n, std::vector<acc_t>& buffer) const {
    const scalar_t* r = data + n * sN;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (sK == 1) return r;
    }
    buffer.resize(K);
    for (int64_t k = 0; k < K; ++k) buffer[k] = static_cast<acc_t>(r[k * sK]);
    return buffer.data();
  }
};

// Row maximum over 64 bytes of independent lanes: GCC leaves a plain max reduction
// scalar, one dependent vmaxss per logit. (A NaN is skipped here; the sums carry it.)
template <typename acc_t>
AGKD_CPU_INLINE acc_t row_max(const acc_t* __restrict x, int64_t K) {
  constexpr int kLanes = 64 / sizeof(acc_t);
  acc_t lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = -std::numeric_limits<acc_t>::infinity();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    AGKD_SIMD
    for (int j = 0; j < kLanes; ++j) lane[j] = std::max(lane[j], x[k + j]);
  }
  for (; k < K; ++k) lane[0] = std::max(lane[0], x[k]);
  acc_t m = lane[0];
  for (int j = 1; j < kLanes; ++j) m = std::max(m, lane[j]);
  return m;
}

}  // namespace agkd
