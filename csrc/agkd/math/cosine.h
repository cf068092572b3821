// Cosine similarity of two flattened samples from their sums x·y, |x|², |y|², with each
// norm clamped to eps separately, as F.cosine_similarity does.
#pragma once

#include <cmath>

#include "agkd/math/common.h"

namespace agkd {

template <typename T>
AGKD_HOST_DEVICE T clamped_norm(T sum_sq, T eps) {
  const T n = std::sqrt(sum_sq);
  return n < eps ? eps : n;  // written so that a NaN norm stays NaN, as clamp_min does
}

template <typename T>
AGKD_HOST_DEVICE T cosine_from_sums(T dot, T sum_xx, T sum_yy, T eps) {
  return dot / (clamped_norm(sum_xx, eps) * clamped_norm(sum_yy, eps));
}

// d cos / dx = coupling·y - self_x·x and d cos / dy = coupling·x - self_y·y, where a norm
// clamped at eps is a constant (no self term), matching autograd through clamp_min.
template <typename T>
struct CosineGrad {
  T coupling, self_x, self_y;
};

template <typename T>
AGKD_HOST_DEVICE CosineGrad<T> cosine_grad(T dot, T sum_xx, T sum_yy, T eps, T scale) {
  const T raw_x = std::sqrt(sum_xx), raw_y = std::sqrt(sum_yy);
  const bool clamp_x = raw_x < eps, clamp_y = raw_y < eps;
  const T nx = clamp_x ? eps : raw_x;
  const T ny = clamp_y ? eps : raw_y;
  const T cos = dot / (nx * ny);
  CosineGrad<T> g;
  g.coupling = scale / (nx * ny);
  g.self_x = clamp_x ? T(0) : scale * cos / (nx * nx);
  g.self_y = clamp_y ? T(0) : scale * cos / (ny * ny);
  return g;
}

}  // namespace agkd
