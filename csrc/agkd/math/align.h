// The MSE term of agkd::align (attention_align_loss), shared by the CPU and CUDA kernels:
//   loss_n += gamma · Σ (up − t)² / (C·H·W)    over the sample's resized pixels,
//   d loss_n / d up = (2·gamma / (C·H·W)) · (up − t),   d loss_n / d t = −(the same).
#pragma once

#include "agkd/math/common.h"

namespace agkd {

// One sample's MSE term from its sum of squared differences over `count` = C·H·W pixels.
template <typename T>
AGKD_HOST_DEVICE T align_mse_term(T gamma, T squared_sum, T count) {
  return gamma * squared_sum / count;
}

// The factor of (up − t) in the gradient, before the upstream gradient.
template <typename T>
AGKD_HOST_DEVICE T align_mse_grad_scale(T gamma, T count) {
  return T(2) * gamma / count;
}

// The gradient with respect to the resized student pixel, for `coeff` = the scale times
// the sample's upstream gradient; the teacher pixel's is its negative.
template <typename acc_t>
AGKD_HOST_DEVICE acc_t align_mse_grad(acc_t coeff, acc_t up, acc_t t) {
  return coeff * (up - t);
}

}  // namespace agkd
