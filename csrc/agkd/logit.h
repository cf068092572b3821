// Host-side checks and outputs of the logit-KD family's ops (agkd::kd_family_fwd, dkd_fwd,
// ofa_fwd, dist_fwd; schemas in ops.cpp). The per-class math is in math/logit.h.
//
// These ops return their gradients with the loss (see math/logit.h for why): the gradient
// of the op's `loss` output as returned — of each row's own loss for reduction "none", of
// the mean or sum otherwise — in the accumulate dtype, or an empty tensor where it was not
// asked for. Their autograd (autograd/logit_autograd.cpp) only scales them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>

#include "agkd/host.h"

namespace agkd {

// The Python API validates with friendlier messages; these guard direct torch.ops calls.
inline void check_logit_pair(const char* op, const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.dim() == 2, op, ": student must be (N, K), got ", shape_of(student));
  TORCH_CHECK(student.sizes() == teacher.sizes(), op, ": student and teacher shapes differ: ", shape_of(student),
              " vs ", shape_of(teacher));
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": student and teacher dtypes differ");
  TORCH_CHECK(student.device() == teacher.device(), op, ": student and teacher are on different devices");
  TORCH_CHECK(student.size(0) > 0 && student.size(1) > 0, op, ": empty input ", shape_of(student));
}

inline void check_positive(const char* op, const char* name, double value) {
  TORCH_CHECK(value > 0, op, ": ", name, " must be > 0, got ", std::to_string(value));
}

inline void check_nonnegative(const char* op, const char* name, double value) {
  TORCH_CHECK(value >= 0, op, ": ", name, " must be >= 0, got ", std::to_string(value));
}

// Class targets (N,) int64 on the logits' device; returned contiguous.
inline at::Tensor class_targets(const char* op, const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong, op,
              ": target must be an int64 (N,) tensor of class indices");
  TORCH_CHECK(target.device() == logits.device(), op, ": target must be on the logits' device");
  return target.contiguous();
}

// (N, M) temperatures of the acc dtype, any strides (a sequence or one value per row is
// usually an expanded tensor).
inline void check_temperature_columns(const char* op, const char* name, const at::Tensor& tau,
                                      const at::Tensor& logits) {
  TORCH_CHECK(tau.dim() == 2 && tau.size(0) == logits.size(0) && tau.size(1) > 0, op, ": ", name,
              " must be (N, M) with M >= 1, got ", shape_of(tau));
  TORCH_CHECK(tau.scalar_type() == accumulate_dtype(logits.scalar_type()), op, ": ", name,
              " must have the logits' accumulate dtype");
  TORCH_CHECK(tau.device() == logits.device(), op, ": ", name, " must be on the logits' device");
}

// A gradient output of a gradient-in-forward op: (like's shape) in the accumulate dtype, or
// empty where not needed.
inline at::Tensor forward_grad_or_empty(const at::Tensor& like, bool needed) {
  const auto options = like.options().dtype(accumulate_dtype(like.scalar_type()));
  return needed ? at::empty(like.sizes(), options.memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, options);
}

// The factor by which a row's gradient becomes the gradient of the op's output: 1/N for
// "mean", 1 otherwise.
inline double output_grad_scale(Reduction reduction, int64_t n) {
  return reduction == Reduction::kMean ? 1.0 / static_cast<double>(n) : 1.0;
}

}  // namespace agkd
