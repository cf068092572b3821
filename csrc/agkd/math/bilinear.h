// Bilinear resampling along one axis, exactly as F.interpolate(mode="bilinear") computes
// it (PyTorch's area_pixel_compute_source_index + guard_index_and_lambda), so that a map
// sampled on the fly equals the interpolated tensor. Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "agkd/math/common.h"

namespace agkd {

// Output index `dst` of `out_size` reads in[i0] * w0 + in[i1] * w1 (i1 == i0 at the end).
template <typename T>
struct LinearTap {
  int64_t i0, i1;
  T w0, w1;
};

// The source-per-destination scale, in T as PyTorch computes it for this dtype.
template <typename T>
AGKD_HOST_DEVICE T linear_scale(int64_t in_size, int64_t out_size, bool align_corners) {
  if (align_corners) return out_size > 1 ? static_cast<T>(in_size - 1) / (out_size - 1) : T(0);
  return static_cast<T>(in_size) / out_size;
}

template <typename T>
AGKD_HOST_DEVICE LinearTap<T> linear_tap(int64_t dst, int64_t in_size, T scale,
                                         bool align_corners) {
  T src = align_corners ? scale * dst : scale * (dst + T(0.5)) - T(0.5);
  if (!align_corners && src < T(0)) src = T(0);
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  T lambda = src - static_cast<T>(i0);
  lambda = lambda < T(0) ? T(0) : (lambda > T(1) ? T(1) : lambda);
  const int64_t i1 = i0 < in_size - 1 ? i0 + 1 : i0;
  return {i0, i1, T(1) - lambda, lambda};
}

}  // namespace agkd
