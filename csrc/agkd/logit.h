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

// ------------------------------------------------ each op's checked call, for both devices

// A per-row loss op's outputs before its kernel runs: the (N,) loss in the accumulate
// dtype and the gradients asked for (forward_grad_or_empty).
struct RowLossOutputs {
  Reduction reduction;
  int64_t N, K;
  at::Tensor loss, grad_s, grad_t;
};

inline RowLossOutputs row_loss_outputs(const at::Tensor& student, const at::Tensor& teacher,
                                       c10::string_view reduction, bool needs_grad_student, bool needs_grad_teacher) {
  const int64_t N = student.size(0), K = student.size(1);
  return {parse_reduction(reduction), N, K,
          at::empty({N}, student.options().dtype(accumulate_dtype(student.scalar_type()))),
          forward_grad_or_empty(student, needs_grad_student), forward_grad_or_empty(teacher, needs_grad_teacher)};
}

// agkd::kd_family_fwd: the arguments checked, whether the teacher shares the student's
// temperature, and the outputs (grad_tau: (N, M), or empty).
struct KdFamilyCall {
  bool tied;
  RowLossOutputs out;
  at::Tensor grad_tau;
};

inline KdFamilyCall prepare_kd_family(const at::Tensor& student, const at::Tensor& teacher,
                                      const at::Tensor& temperature,
                                      const std::optional<at::Tensor>& teacher_temperature, bool standardize,
                                      double standardize_eps, c10::string_view reduction, bool needs_grad_student,
                                      bool needs_grad_teacher, bool needs_grad_temperature) {
  constexpr const char* op = "agkd::kd_family_fwd";
  check_logit_pair(op, student, teacher);
  check_temperature_columns(op, "temperature", temperature, student);
  const bool tied = !teacher_temperature.has_value() || !teacher_temperature->defined();
  if (!tied) {
    check_temperature_columns(op, "teacher_temperature", *teacher_temperature, student);
    TORCH_CHECK(teacher_temperature->size(1) == temperature.size(1), op,
                ": teacher_temperature must have temperature's shape");
  }
  TORCH_CHECK(!standardize || student.size(1) >= 2, op, ": standardize needs K >= 2");
  if (standardize) check_positive(op, "standardize_eps", standardize_eps);
  return {tied, row_loss_outputs(student, teacher, reduction, needs_grad_student, needs_grad_teacher),
          needs_grad_temperature ? at::empty({student.size(0), temperature.size(1)}, temperature.options())
                                 : at::empty({0}, temperature.options())};
}

// agkd::dkd_fwd / ofa_fwd: the logits, the temperature and the class targets checked (not
// their range: the CPU checks that on the host, CUDA in the kernel), the targets
// contiguous, the outputs.
struct TargetLossCall {
  at::Tensor classes;
  RowLossOutputs out;
};

inline TargetLossCall prepare_target_loss(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& target, double temperature, c10::string_view reduction,
                                          bool needs_grad_student, bool needs_grad_teacher) {
  check_logit_pair(op, student, teacher);
  check_positive(op, "temperature", temperature);
  return {class_targets(op, target, student),
          row_loss_outputs(student, teacher, reduction, needs_grad_student, needs_grad_teacher)};
}

inline TargetLossCall prepare_dkd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                                  double temperature, double tckd_weight, double nckd_weight,
                                  c10::string_view reduction, bool needs_grad_student, bool needs_grad_teacher) {
  constexpr const char* op = "agkd::dkd_fwd";
  check_nonnegative(op, "tckd_weight", tckd_weight);
  check_nonnegative(op, "nckd_weight", nckd_weight);
  TORCH_CHECK(student.dim() != 2 || student.size(1) >= 2, op, ": needs K >= 2 classes");
  return prepare_target_loss(op, student, teacher, target, temperature, reduction, needs_grad_student,
                             needs_grad_teacher);
}

inline TargetLossCall prepare_ofa(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                                  double temperature, double eps, c10::string_view reduction, bool needs_grad_student,
                                  bool needs_grad_teacher) {
  constexpr const char* op = "agkd::ofa_fwd";
  check_positive(op, "eps", eps);
  return prepare_target_loss(op, student, teacher, target, temperature, reduction, needs_grad_student,
                             needs_grad_teacher);
}

// agkd::dist_fwd: the arguments checked.
inline void check_dist(const at::Tensor& student, const at::Tensor& teacher, double temperature, double inter_weight,
                       double intra_weight, double eps) {
  constexpr const char* op = "agkd::dist_fwd";
  check_logit_pair(op, student, teacher);
  check_positive(op, "temperature", temperature);
  check_nonnegative(op, "inter_weight", inter_weight);
  check_nonnegative(op, "intra_weight", intra_weight);
  check_positive(op, "eps", eps);
}

}  // namespace agkd
