// Host-side checks of one KD call (agkd::kd_fwd, schema in ops.cpp),
// shared by the CPU and CUDA implementations. The per-row math is in math/kd.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "agkd/host.h"
#include "agkd/math/kd.h"

namespace agkd {

struct KdParams {
  double temperature;
  double ce_weight;  // weight of the cross-entropy with the targets; 0: no targets needed
  double kl_weight;  // weight of τ²·KL(p_t ‖ p_s); 0 skips the teacher entirely
  double label_smoothing = 0.0;         // ε of the cross-entropy's target
  std::optional<int64_t> ignore_index;  // rows with this class target count for nothing
  bool with_ce() const { return ce_weight != 0.0; }
  bool with_kl() const { return kl_weight != 0.0; }
};

struct KdGeometry {
  int64_t N, K;
};

// The target a kernel reads: class indices (int64, contiguous) or probability rows (the
// logits' dtype, any strides), or none.
struct KdTarget {
  at::Tensor tensor;     // undefined: no target read
  bool probabilities = false;
  bool ignores = false;  // class indices with an ignore_index: some rows may be skipped
  int64_t ignore_index = 0;
  const int64_t* classes() const {
    return tensor.defined() && !probabilities ? tensor.const_data_ptr<int64_t>() : nullptr;
  }
  RowMask mask() const { return {classes(), ignores, ignore_index}; }
};

// The Python API validates with friendlier messages; these guard direct torch.ops calls.
inline KdGeometry check_kd_inputs(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& target,
                                  const KdParams& p) {
  TORCH_CHECK(student.dim() == 2, "agkd::kd: student must be (N, K), got ", shape_of(student));
  TORCH_CHECK(student.sizes() == teacher.sizes(), "agkd::kd: student and teacher shapes differ: ",
              shape_of(student), " vs ", shape_of(teacher));
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "agkd::kd: student and teacher dtypes differ");
  TORCH_CHECK(student.device() == teacher.device(),
              "agkd::kd: student and teacher are on different devices");
  TORCH_CHECK(student.size(0) > 0 && student.size(1) > 0, "agkd::kd: empty input ", shape_of(student));
  // Numbers go through std::to_string: CUDA host code streams none (docs/design.md, section 7).
  TORCH_CHECK(p.temperature > 0, "agkd::kd: temperature must be > 0, got ", std::to_string(p.temperature));
  TORCH_CHECK(p.label_smoothing >= 0 && p.label_smoothing <= 1,
              "agkd::kd: label_smoothing must be in [0, 1], got ", std::to_string(p.label_smoothing));
  const bool has_target = target.has_value() && target->defined();
  TORCH_CHECK(has_target || !p.with_ce(), "agkd::kd: ce_weight != 0 needs a target");
  TORCH_CHECK(has_target || !p.ignore_index.has_value(), "agkd::kd: ignore_index needs a target");
  if (has_target) {
    TORCH_CHECK(target->device() == student.device(), "agkd::kd: target must be on the logits' device");
    if (target->is_floating_point()) {  // probabilities
      TORCH_CHECK(target->sizes() == student.sizes() && target->scalar_type() == student.scalar_type(),
                  "agkd::kd: probability targets must be (N, K) of the logits' dtype");
      TORCH_CHECK(!p.ignore_index.has_value(),
                  "agkd::kd: ignore_index applies to class-index targets only");
    } else {
      TORCH_CHECK(target->dim() == 1 && target->size(0) == student.size(0) &&
                      target->scalar_type() == at::kLong,
                  "agkd::kd: class targets must be an int64 (N,) tensor");
    }
  }
  return {student.size(0), student.size(1)};
}

// The target as the kernels read it (class indices made contiguous). The CE term needs it,
// an ignore_index masks the KL term's rows too, and a target given with ce_weight 0 is
// still checked: a bad target is an error (CPU) or a NaN row (CUDA) whatever the weights.
inline KdTarget kd_target(const std::optional<at::Tensor>& target, const KdParams& p) {
  KdTarget t;
  if (!target.has_value() || !target->defined()) return t;
  t.probabilities = target->is_floating_point();
  t.tensor = t.probabilities ? *target : target->contiguous();
  t.ignores = p.ignore_index.has_value();
  t.ignore_index = p.ignore_index.value_or(0);
  return t;
}

// The denominator of reduction "mean": N, or with an ignore_index the rows that count, at
// least 1 (a batch with every row ignored has loss 0 and zero gradients, not 0/0 = NaN).
// Counted on the device: no value comes back to the host.
inline at::Tensor kd_counted_rows(const at::Tensor& classes, int64_t ignore_index,
                                  at::ScalarType dtype) {
  return classes.ne(ignore_index).sum().clamp_min(1).to(dtype);
}

// The gradients agkd::kd_fwd writes with the loss when asked: of the loss output (the
// reduced loss for "mean"/"sum"; each row's own loss for "none"), in the accumulate dtype,
// contiguous. Each row's gradient carries a factor, 1 or the "mean"'s 1/count; with an
// ignore_index that count is a device tensor (kd_counted_rows), read by the kernel.
struct KdForwardGrads {
  at::Tensor student, teacher;   // the op's outputs: (N, K), or (0,) when not asked for
  bool write_student = false, write_teacher = false;  // what the kernel writes
  double row_factor = 1.0;       // 1, or 1/N for a "mean" without ignore_index
  at::Tensor counted_rows;       // a "mean" with ignore_index: the 0-dim count; else undefined
};

inline KdForwardGrads kd_forward_grads(const at::Tensor& student, const KdParams& p, Reduction reduction,
                                       const KdTarget& target, bool needs_grad_student, bool needs_grad_teacher) {
  const auto options = student.options().dtype(accumulate_dtype(student.scalar_type()));
  const auto grad = [&](bool needed) { return needed ? at::empty(student.sizes(), options) : at::empty({0}, options); };
  KdForwardGrads g;
  g.student = grad(needs_grad_student);
  g.teacher = grad(needs_grad_teacher);
  g.write_student = needs_grad_student;
  g.write_teacher = needs_grad_teacher && p.with_kl();
  if (needs_grad_teacher && !p.with_kl()) g.teacher.zero_();  // the cross-entropy alone: no teacher gradient
  if (reduction == Reduction::kMean) {
    if (target.ignores) g.counted_rows = kd_counted_rows(target.tensor, target.ignore_index, accumulate_dtype(student.scalar_type()));
    else g.row_factor = 1.0 / static_cast<double>(student.size(0));
  }
  return g;
}

// The forward's loss output: reduce_loss (host.h), except that with an ignore_index a
// "mean" averages over the rows that count, the count the gradients used.
inline at::Tensor reduce_kd_loss(const at::Tensor& per_row, Reduction reduction, const KdForwardGrads& g) {
  if (g.counted_rows.defined()) return per_row.sum().div(g.counted_rows);
  return reduce_loss(per_row, reduction);
}

}  // namespace agkd

