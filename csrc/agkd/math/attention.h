// Attention transfer maps (Zagoruyko & Komodakis): a = mean_c |F_c|^p, then a / ‖a‖₂ per
// sample. The per-element math of agkd::attention_map_fwd/bwd, shared by CPU and CUDA.
#pragma once

#include <cmath>

#include "agkd/math/common.h"

namespace agkd {

// Which form |x|^p takes; p = 2 (the usual choice) and p = 1 avoid pow entirely.
enum class PowKind : int { kSquare, kAbs, kGeneral };

inline PowKind pow_kind(double p) {
  return p == 2.0 ? PowKind::kSquare : (p == 1.0 ? PowKind::kAbs : PowKind::kGeneral);
}

template <PowKind kKind, typename T>
AGKD_HOST_DEVICE T abs_pow(T x, T p) {
  const T a = x < T(0) ? -x : x;  // |x| (a NaN stays NaN)
  if (kKind == PowKind::kSquare) return x * x;
  if (kKind == PowKind::kAbs) return a;
  return std::pow(a, p);
}

// d|x|^p / dx = p·|x|^(p-1)·sign(x), taken as 0 at x = 0 for every p (the subgradient
// of |x|; for p < 1 the derivative there is unbounded and autograd of abs().pow() gives NaN).
template <PowKind kKind, typename T>
AGKD_HOST_DEVICE T abs_pow_grad(T x, T p) {
  if (kKind == PowKind::kSquare) return T(2) * x;
  const T sign = x > T(0) ? T(1) : (x < T(0) ? T(-1) : x);  // 0 at 0, NaN stays NaN
  if (kKind == PowKind::kAbs) return sign;
  const T a = x < T(0) ? -x : x;
  return x == T(0) ? T(0) : p * std::pow(a, p - T(1)) * sign;
}

// Gradient of out = a / max(‖a‖, eps) at one pixel, given g = ∂L/∂out there and
// dot = Σ out·g over the sample: (g − out·dot) / ‖a‖, or g / eps where the norm is clamped
// (a constant then, as in F.normalize's clamp_min). The per-sample part is taken once, as
// a dot to subtract and a factor (the reciprocal times `scale`, e.g. 1/C), so that the
// per-pixel work is a multiply-add.
template <typename T>
struct NormalizeGrad {
  T dot, factor;
  AGKD_HOST_DEVICE T operator()(T g, T out) const { return (g - out * dot) * factor; }
};

template <typename T>
AGKD_HOST_DEVICE NormalizeGrad<T> normalize_grad(T dot, T norm, T eps, T scale) {
  return norm < eps ? NormalizeGrad<T>{T(0), scale / eps} : NormalizeGrad<T>{dot, scale / norm};
}

}  // namespace agkd
