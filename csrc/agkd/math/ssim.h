// SSIM (Wang et al. 2004) from windowed moments, and its derivative with respect to the
// five raw moments. The kernels blur x, y, x², y², xy with a separable Gaussian and call
// these per output pixel; backward blurs the derivatives back (the transposed window).
#pragma once

#include <cmath>
#include <vector>

#include "agkd/math/common.h"

namespace agkd {

// Normalised 1-D Gaussian of odd length `window_size`, computed in double on the host so
// that every device and dtype starts from the same taps, then rounded once to acc_t.
template <typename acc_t>
std::vector<acc_t> gaussian_taps(int64_t window_size, double sigma) {
  std::vector<double> taps(window_size);
  const double center = static_cast<double>(window_size / 2);
  double total = 0.0;
  for (int64_t i = 0; i < window_size; ++i) {
    const double d = static_cast<double>(i) - center;
    taps[i] = std::exp(-(d * d) / (2.0 * sigma * sigma));
    total += taps[i];
  }
  std::vector<acc_t> out(window_size);
  for (int64_t i = 0; i < window_size; ++i) out[i] = static_cast<acc_t>(taps[i] / total);
  return out;
}

// The five windowed raw moments at one output pixel: E[x], E[y], E[x²], E[y²], E[xy].
template <typename T>
struct Moments {
  T mx, my, exx, eyy, exy;
};

// SSIM at one pixel. Variances are population variances E[x²] - E[x]², formed in the
// accumulation type (float32 for half inputs), never in the input's precision.
template <typename T>
AGKD_HOST_DEVICE T ssim_from_moments(const Moments<T>& m, T c1, T c2) {
  const T mxy = m.mx * m.my;
  const T mxx = m.mx * m.mx;
  const T myy = m.my * m.my;
  const T num = (T(2) * mxy + c1) * (T(2) * (m.exy - mxy) + c2);
  const T den = (mxx + myy + c1) * ((m.exx - mxx) + (m.eyy - myy) + c2);
  return num / den;
}

// scale * dS/d(moment) at one pixel. S = a1·a2 / (b1·b2) with a1 = 2μxμy + C1,
// a2 = 2σxy + C2, b1 = μx² + μy² + C1, b2 = σx² + σy² + C2, where σ are written in raw
// moments; dS/dE[x²] = dS/dE[y²], so one field serves both.
template <typename T>
struct MomentGrads {
  T d_mx, d_my, d_e2, d_exy;
};

template <typename T>
AGKD_HOST_DEVICE MomentGrads<T> ssim_moment_grads(const Moments<T>& m, T c1, T c2, T scale) {
  const T mxy = m.mx * m.my;
  const T a1 = T(2) * mxy + c1;
  const T a2 = T(2) * (m.exy - mxy) + c2;
  const T b1 = m.mx * m.mx + m.my * m.my + c1;
  const T b2 = (m.exx - m.mx * m.mx) + (m.eyy - m.my * m.my) + c2;
  const T inv_b1b2 = T(1) / (b1 * b2);
  const T s = a1 * a2 * inv_b1b2;
  const T two_s_diff = T(2) * s * (T(1) / b1 - T(1) / b2);
  const T two_a_diff = T(2) * (a2 - a1) * inv_b1b2;
  MomentGrads<T> g;
  g.d_mx = scale * (m.my * two_a_diff - m.mx * two_s_diff);
  g.d_my = scale * (m.mx * two_a_diff - m.my * two_s_diff);
  g.d_e2 = scale * (-s / b2);
  g.d_exy = scale * (T(2) * a1 * inv_b1b2);
  return g;
}

// Gradient at one input pixel from the transposed-blurred moment derivatives:
// d/dx = blur(d_mx) + 2x·blur(d_e2) + y·blur(d_exy)   (and symmetrically for y).
template <typename T>
AGKD_HOST_DEVICE T ssim_pixel_grad(T blurred_d_mean, T blurred_d_e2, T blurred_d_exy, T self,
                                   T other) {
  return blurred_d_mean + T(2) * self * blurred_d_e2 + other * blurred_d_exy;
}

}  // namespace agkd
