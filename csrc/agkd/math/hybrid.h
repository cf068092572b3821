// One sample of the hybrid loss from its sums, and the layout of the statistics the
// forward saves for the backward. Shared by the CPU and CUDA kernels of agkd::hybrid_* and
// agkd::align_* (which adds its MSE term as `extra`).
#pragma once

#include "agkd/math/common.h"
#include "agkd/math/cosine.h"

namespace agkd {

// What the forward keeps per sample (the (N, kHybridStats) `stats` tensor): the cosine sums.
enum HybridStat : int { kStatDot = 0, kStatXX, kStatYY, kHybridStats };

// A sample's (or a part of one's) sums: SSIM over output pixels, cosine over source pixels.
// Added in double, in a fixed order, by every device.
struct HybridSums {
  double ssim = 0, dot = 0, xx = 0, yy = 0;
  AGKD_HOST_DEVICE HybridSums& operator+=(const HybridSums& o) {
    ssim += o.ssim, dot += o.dot, xx += o.xx, yy += o.yy;
    return *this;
  }
};

// loss = extra + alpha (1 - ssim / ssim_count) + beta (1 - cos); a zero weight skips its term
// (so a NaN in the other term's sums cannot leak in through 0 · NaN).
template <typename acc_t>
AGKD_HOST_DEVICE void finish_hybrid_sample(const HybridSums& s, double alpha, double beta,
                                           double eps, double ssim_count, double extra,
                                           acc_t* loss, acc_t* stats) {
  double value = extra;
  if (alpha != 0) value += alpha * (1.0 - s.ssim / ssim_count);
  if (beta != 0) value += beta * (1.0 - cosine_from_sums(s.dot, s.xx, s.yy, eps));
  *loss = static_cast<acc_t>(value);
  stats[kStatDot] = static_cast<acc_t>(s.dot);
  stats[kStatXX] = static_cast<acc_t>(s.xx);
  stats[kStatYY] = static_cast<acc_t>(s.yy);
}

// The cosine term's gradient coefficients of one sample from its saved stats.
template <typename acc_t>
AGKD_HOST_DEVICE CosineGrad<acc_t> hybrid_cosine_grad(const acc_t* stats, double beta, double eps,
                                                      acc_t grad_loss) {
  return cosine_grad(stats[kStatDot], stats[kStatXX], stats[kStatYY], static_cast<acc_t>(eps),
                     static_cast<acc_t>(-beta) * grad_loss);
}

}  // namespace agkd
