// Min–max scaling of one map on the CPU, shared by agkd::minmax_scale_fwd/bwd
// (attention_map_cpu.cpp) and by the attention alignment's scaled form (align_cpu.cpp,
// `minmax_eps`): the map as a dense run, its range, its scaled values, and the gradient
// through the scaling. The math is math/attention.h's, the same as the CUDA kernels'.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "agkd/cpu/vectorize.h"
#include "agkd/math/attention.h"

namespace agkd {

// An H×W map with strides (sH, sW) as a dense run of acc_t: the map itself when it
// already is one (float, dense), else a copy in `buffer`.
template <typename scalar_t>
AGKD_CPU_INLINE const at::opmath_type<scalar_t>* dense_plane(const scalar_t* map, int64_t H, int64_t W, int64_t sH,
                                                             int64_t sW,
                                                             std::vector<at::opmath_type<scalar_t>>& buffer) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (sW == 1 && (sH == W || H == 1)) return map;
  }
  buffer.resize(H * W);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t w = 0; w < W; ++w) buffer[h * W + w] = static_cast<acc_t>(map[h * sH + w * sW]);
  }
  return buffer.data();
}

template <typename acc_t>
struct MinmaxRange {
  acc_t lo, hi;
};

// The three loops below are cloned for AVX2+FMA like the other hot loops, and every caller
// uses these clones: the vector width fixes the order of the sums, so the fused alignment
// and minmax_scale's op give the same bits. Internal linkage (one copy per translation
// unit), as GCC's function clones require of functions defined in a header.
namespace {

// The minimum and maximum of m[0, P); both NaN when any value is, as torch.amin/amax.
// Over 64 bytes of independent lanes, as row_max (rows.h): GCC leaves a plain min/max
// reduction scalar.
template <typename acc_t>
AGKD_CPU_MULTIVERSION MinmaxRange<acc_t> minmax_range(const acc_t* __restrict m, int64_t P) {
  constexpr int kLanes = 64 / sizeof(acc_t);
  acc_t lo[kLanes], hi[kLanes], nans[kLanes];
  for (int j = 0; j < kLanes; ++j) lo[j] = std::numeric_limits<acc_t>::infinity(), hi[j] = -lo[j], nans[j] = 0;
  int64_t k = 0;
  for (; k + kLanes <= P; k += kLanes) {
    AGKD_SIMD
    for (int j = 0; j < kLanes; ++j) {
      const acc_t x = m[k + j];
      lo[j] = std::min(lo[j], x), hi[j] = std::max(hi[j], x), nans[j] += x != x ? acc_t(1) : acc_t(0);
    }
  }
  for (; k < P; ++k) lo[0] = std::min(lo[0], m[k]), hi[0] = std::max(hi[0], m[k]), nans[0] += m[k] != m[k];
  MinmaxRange<acc_t> r{lo[0], hi[0]};
  acc_t any_nan = nans[0];
  for (int j = 1; j < kLanes; ++j) r.lo = std::min(r.lo, lo[j]), r.hi = std::max(r.hi, hi[j]), any_nan += nans[j];
  if (any_nan != 0) r.lo = r.hi = std::numeric_limits<acc_t>::quiet_NaN();
  return r;
}

// out[k] = (m[k] − lo) / (hi − lo), rounded to scalar_t; 0 for a constant map.
template <typename scalar_t, typename acc_t>
AGKD_CPU_MULTIVERSION void minmax_write(const acc_t* m, int64_t P, MinmaxRange<acc_t> r, acc_t eps, scalar_t* out) {
  const bool constant = minmax_constant(r.lo, r.hi, eps);
  AGKD_SIMD
  for (int64_t k = 0; k < P; ++k) out[k] = static_cast<scalar_t>(minmax_value(m[k], r.lo, r.hi, constant));
}

// out[k] = ∂L/∂m[k] from u, the gradient with respect to the scaled map (MinmaxGrad).
template <typename scalar_t, typename acc_t>
AGKD_CPU_MULTIVERSION void minmax_chain(const acc_t* u, const acc_t* m, int64_t P, MinmaxRange<acc_t> r, acc_t eps,
                                  scalar_t* out) {
  double sum_g = 0, sum_gs = 0, n_lo = 0, n_hi = 0;
  if (!minmax_constant(r.lo, r.hi, eps)) {  // a constant map's gradient is 0 whatever the sums
    const acc_t lo = r.lo, range = r.hi - r.lo;
    AGKD_SIMD_REDUCTION(+ : sum_g, sum_gs, n_lo, n_hi)
    for (int64_t k = 0; k < P; ++k) {
      const double gk = u[k], sk = (m[k] - lo) / range;  // sk: minmax_value of a map that is not constant
      sum_g += gk, sum_gs += gk * sk;
      n_lo += m[k] == lo ? 1.0 : 0.0, n_hi += m[k] == r.hi ? 1.0 : 0.0;
    }
  }
  const MinmaxGrad<acc_t> grad_of = minmax_grad(r.lo, r.hi, eps, sum_g, sum_gs, n_lo, n_hi);
  AGKD_SIMD
  for (int64_t k = 0; k < P; ++k) out[k] = static_cast<scalar_t>(grad_of(u[k], m[k]));
}

}  // namespace
}  // namespace agkd
