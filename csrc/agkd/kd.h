// Host-side checks of one KD call (agkd::kd_fwd / agkd::kd_bwd, schemas in ops.cpp),
// shared by the CPU and CUDA implementations. The per-row math is in math/kd.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "agkd/host.h"
#include "agkd/math/kd.h"

namespace agkd {

struct KdParams {
  double temperature;
  double ce_weight;  // weight of the cross-entropy with the targets; 0: no targets needed
  double kl_weight;  // weight of τ²·KL(p_t ‖ p_s); 0 skips the teacher entirely
  bool with_ce() const { return ce_weight != 0.0; }
  bool with_kl() const { return kl_weight != 0.0; }
};

struct KdGeometry {
  int64_t N, K;
};

// The Python API validates with friendlier messages; these guard direct torch.ops calls.
inline KdGeometry check_kd_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& target,
                                  const KdParams& p) {
  TORCH_CHECK(student.dim() == 2, "agkd::kd: student must be (N, K), got ", student.sizes());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "agkd::kd: student and teacher shapes differ: ",
              student.sizes(), " vs ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "agkd::kd: student and teacher dtypes differ");
  TORCH_CHECK(student.device() == teacher.device(),
              "agkd::kd: student and teacher are on different devices");
  TORCH_CHECK(student.size(0) > 0 && student.size(1) > 0, "agkd::kd: empty input ",
              student.sizes());
  TORCH_CHECK(p.temperature > 0, "agkd::kd: temperature must be > 0, got ", p.temperature);
  if (p.with_ce()) {
    TORCH_CHECK(target.has_value() && target->defined(),
                "agkd::kd: ce_weight != 0 needs a target");
    TORCH_CHECK(target->dim() == 1 && target->size(0) == student.size(0) &&
                    target->scalar_type() == at::kLong && target->device() == student.device(),
                "agkd::kd: target must be an int64 (N,) tensor on the logits' device");
  }
  return {student.size(0), student.size(1)};
}

inline void check_kd_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& stats,
                                     const at::Tensor& student, const KdGeometry& g) {
  const auto acc = accumulate_dtype(student.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == g.N && grad_loss.scalar_type() == acc,
              "agkd::kd_bwd: grad_loss must be (N,) of the accumulate dtype");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == g.N && stats.size(1) == kKdStats &&
                  stats.scalar_type() == acc,
              "agkd::kd_bwd: stats must be (N, ", int(kKdStats), ") of the accumulate dtype");
  TORCH_CHECK(grad_loss.device() == student.device() && stats.device() == student.device(),
              "agkd::kd_bwd: grad_loss and stats must be on the logits' device");
}

// What agkd::kd_bwd hands its kernel, with the cases that need no kernel settled: an
// unneeded gradient is an empty tensor, and the teacher's gradient of the cross-entropy
// alone is zero.
struct KdBackward {
  at::Tensor grad_student, grad_teacher;  // the op's outputs
  at::Tensor grad_loss, stats, target;    // contiguous inputs (target undefined without CE)
  bool student = false, teacher = false;  // which gradients the kernel must write
  const int64_t* target_data() const {
    return target.defined() ? target.const_data_ptr<int64_t>() : nullptr;
  }
};

inline KdBackward prepare_kd_backward(const at::Tensor& grad_loss, const at::Tensor& student,
                                      const at::Tensor& teacher,
                                      const std::optional<at::Tensor>& target,
                                      const at::Tensor& stats, const KdParams& p,
                                      bool needs_grad_student, bool needs_grad_teacher) {
  const KdGeometry g = check_kd_inputs(student, teacher, target, p);
  check_kd_backward_inputs(grad_loss, stats, student, g);
  KdBackward b;
  b.grad_student = input_grad_or_empty(student, needs_grad_student);
  b.grad_teacher = input_grad_or_empty(teacher, needs_grad_teacher);
  b.student = needs_grad_student;
  b.teacher = needs_grad_teacher && p.with_kl();
  if (needs_grad_teacher && !p.with_kl()) b.grad_teacher.zero_();
  b.grad_loss = grad_loss.contiguous();
  b.stats = stats.contiguous();
  if (p.with_ce()) b.target = target->contiguous();
  return b;
}

}  // namespace agkd

