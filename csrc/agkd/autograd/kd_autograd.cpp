// Autograd of agkd::kd_fwd (schema in ops.cpp; kernels in cpu/kd_cpu.cpp and
// cuda/kd_cuda.cu). The forward is asked for the gradients of the inputs that require
// one and writes them in the pass that computes the loss; the backward scales them by
// the upstream gradient, or hands them over as they are when that is exactly 1 on the
// CPU (autograd.h, forward_grads_for_backward).
#include <ATen/ops/zeros_like.h>

#include <optional>
#include <string>

#include "agkd/autograd/autograd.h"
#include "agkd/kd.h"

namespace agkd {
namespace {

// ∂loss/∂q of a probability target q that requires grad (F.cross_entropy differentiates
// it too): the cross-entropy is −Σ_k q'_k log softmax(s)_k with q' = (1 − ε)·q + ε/K, so
// the gradient is −ce_weight·(1 − ε)·log softmax(s), times each row's upstream gradient.
// Rarely asked for, so it is a few ATen ops on the saved row maximum and log-normaliser
// rather than a kernel output.
at::Tensor probability_target_grad(const at::Tensor& grad_rows, const at::Tensor& student,
                                   const at::Tensor& stats, double ce_weight,
                                   double label_smoothing) {
  if (ce_weight == 0.0) return at::zeros_like(student);
  const at::Tensor log_p = student.to(stats.scalar_type())
                               .sub(stats.select(1, kStatMaxS).unsqueeze(1))
                               .sub_(stats.select(1, kStatLogZCE).unsqueeze(1));
  const at::Tensor row_scale = grad_rows.to(stats.scalar_type()).mul(-ce_weight * (1.0 - label_smoothing));
  return log_p.mul_(row_scale.unsqueeze(1)).to(student.scalar_type());
}

class KdFunction : public torch::autograd::Function<KdFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student,
                               const at::Tensor& teacher, const std::optional<at::Tensor>& target,
                               double temperature, double ce_weight, double kl_weight,
                               double label_smoothing, std::optional<int64_t> ignore_index,
                               c10::string_view reduction, bool needs_grad_student, bool needs_grad_teacher) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats, grad_student, grad_teacher] = op_handle<op::KdFwd>().call(
        student, teacher, target, temperature, ce_weight, kl_weight, label_smoothing, ignore_index, reduction,
        needs_grad_student, needs_grad_teacher);
    // The inputs are kept for their dtypes and, with the stats, for a probability target's
    // gradient; a gradient taken with create_graph=True then depends on them, so that its
    // double backward is FirstOrderOnly's clear error, not a silently missing term.
    ctx->save_for_backward({grad_student, grad_teacher, student, teacher, target.value_or(at::Tensor()), stats});
    auto& d = ctx->saved_data;
    d["flags"] = std::vector<bool>{needs_grad_student, needs_grad_teacher};
    d["ce_weight"] = ce_weight;
    d["label_smoothing"] = label_smoothing;
    d["reduction"] = std::string(reduction);
    ctx->mark_non_differentiable({stats, grad_student, grad_teacher});
    ctx->set_materialize_grads(false);  // only the loss gets a gradient: allocate none for the rest
    return {loss, stats, grad_student, grad_teacher};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(11);  // one per forward argument; undefined: no gradient
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &saved_student = saved[0], &saved_teacher = saved[1], &student = saved[2],
                     &teacher = saved[3], &target = saved[4], &stats = saved[5];
    const auto& d = ctx->saved_data;
    const auto flags = d.at("flags").toBoolList();
    const bool needs_student = ctx->needs_input_grad(0), needs_teacher = ctx->needs_input_grad(1);
    check_computed(op::KdFwd::kName, "needs_grad_student", needs_student, flags.get(0));
    check_computed(op::KdFwd::kName, "needs_grad_teacher", needs_teacher, flags.get(1));
    const at::Tensor& g = grads[0];
    const variable_list handed = forward_grads_for_backward<op::KdFwd>(g, {saved_student, saved_teacher},
                                                                        {student, teacher}, {needs_student, needs_teacher});
    out[0] = handed[0], out[1] = handed[1];
    if (target.defined() && target.is_floating_point() && ctx->needs_input_grad(2)) {
      // (An ignore_index comes with class targets only, so every row counts here.)
      const c10::string_view reduction = d.at("reduction").toStringView();
      out[2] = probability_target_grad(per_sample_grad(g, reduction, student.size(0)), student, stats,
                                       d.at("ce_weight").toDouble(), d.at("label_smoothing").toDouble());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_fwd_autograd(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    double temperature, double ce_weight, double kl_weight, double label_smoothing,
    std::optional<int64_t> ignore_index, c10::string_view reduction, bool needs_grad_student,
    bool needs_grad_teacher) {
  const variable_list out = KdFunction::apply(student, teacher, target, temperature, ce_weight, kl_weight,
                                              label_smoothing, ignore_index, reduction, needs_grad_student,
                                              needs_grad_teacher);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, Autograd, m) { register_kernel<op::KdFwd>(m, &kd_fwd_autograd); }

}  // namespace agkd
