// Host-side description and checks of one attention-alignment call (agkd::align_fwd /
// agkd::align_bwd, schemas in ops.cpp), shared by the CPU and CUDA implementations: the
// hybrid terms plus an MSE term, with the student resized bilinearly to the teacher's size.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>

#include "agkd/hybrid.h"

namespace agkd {

struct AlignParams {
  HybridParams hybrid;
  double gamma;  // weight of the mean squared difference
  bool align_corners;
  std::optional<double> minmax_eps;  // set: both maps min–max scaled first, ranges <= it constant
};

inline AlignParams make_align_params(double alpha, double beta, double gamma, int64_t window_size,
                                     double sigma, double c1, double c2, c10::string_view padding,
                                     double eps, bool align_corners, std::optional<double> minmax_eps) {
  TORCH_CHECK(!minmax_eps || *minmax_eps >= 0, "agkd::align: minmax_eps must be >= 0, got ", *minmax_eps);
  return {make_params(alpha, beta, window_size, sigma, c1, c2, padding, eps), gamma,
          align_corners, minmax_eps};
}

// Checks shared by align_fwd/bwd; returns the teacher's geometry.
inline PlaneGeometry align_geometry(const at::Tensor& student, const at::Tensor& teacher,
                             const HybridParams& p) {
  TORCH_CHECK(student.dim() == 4 && teacher.dim() == 4,
              "agkd::align: student and teacher must be (N, C, H, W)");
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
              "agkd::align: student and teacher batch/channels differ: ", shape_of(student), " vs ",
              shape_of(teacher));
  TORCH_CHECK(student.numel() > 0, "agkd::align: empty student ", shape_of(student));
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type() &&
                  student.device() == teacher.device(),
              "agkd::align: student and teacher dtypes or devices differ");
  return make_geometry(teacher, teacher, p);
}

}  // namespace agkd
