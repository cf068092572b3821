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

// Min–max scaling of one (sample, channel) map m: s = (m − lo) / (hi − lo), with lo, hi its
// minimum and maximum. A map whose range is at most eps is constant: s = 0 with a zero
// gradient (dividing by a clamped range would scale its gradient by 1/eps). A NaN makes
// lo, hi and so every value of its map NaN, as torch.amin/amax do.
template <typename T>
AGKD_HOST_DEVICE bool minmax_constant(T lo, T hi, T eps) {
  return hi - lo <= eps;  // false for NaN: a NaN map stays NaN
}

template <typename T>
AGKD_HOST_DEVICE T minmax_value(T m, T lo, T hi, bool constant) {
  return constant ? T(0) : (m - lo) / (hi - lo);
}

// The gradient of one map's scaling, at pixel j with upstream gradient g_j:
//   ∂L/∂m_j = (g_j + [m_j = lo]·(Σgs − Σg)/n_lo − [m_j = hi]·Σgs/n_hi) / (hi − lo)
// with Σg = Σ_k g_k, Σgs = Σ_k g_k s_k over the map, and n_lo, n_hi the number of pixels at
// the minimum and at the maximum: at a tie, the gradient of lo and hi is shared evenly,
// where torch.amin/amax send it. 0 everywhere for a constant map.
template <typename T>
struct MinmaxGrad {
  T lo, hi, inv_range, at_lo, at_hi;  // at_lo = (Σgs − Σg)/n_lo, at_hi = Σgs/n_hi
  bool constant;
  AGKD_HOST_DEVICE T operator()(T g, T m) const {
    if (constant) return T(0);
    // Selects rather than branches, so that a lane loop over the map vectorises.
    return (g + (m == lo ? at_lo : T(0)) - (m == hi ? at_hi : T(0))) * inv_range;
  }
};

template <typename T, typename Sum>
AGKD_HOST_DEVICE MinmaxGrad<T> minmax_grad(T lo, T hi, T eps, Sum sum_g, Sum sum_gs, Sum n_lo, Sum n_hi) {
  const bool constant = minmax_constant(lo, hi, eps);
  return {lo, hi, T(1) / (hi - lo), static_cast<T>((sum_gs - sum_g) / n_lo), static_cast<T>(sum_gs / n_hi),
          constant};
}

}  // namespace agkd
