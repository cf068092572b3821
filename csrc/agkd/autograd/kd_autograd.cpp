// Autograd of agkd::kd_fwd / agkd::kd_bwd (schemas in ops.cpp; kernels in cpu/kd_cpu.cpp
// and cuda/kd_cuda.cu). The forward saves the logits, the targets and the per-row stats;
// the backward is one agkd::kd_bwd call for both gradients.
#include <optional>
#include <string>

#include "agkd/autograd/autograd.h"
#include "agkd/kd.h"

namespace agkd {
namespace {

struct KdBwdOp {
  static constexpr const char* kForwardName = op::KdFwd::kName;
  static std::tuple<at::Tensor, at::Tensor> call(
      const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
      const std::optional<at::Tensor>& target, const at::Tensor& stats, double temperature,
      double ce_weight, double kl_weight, double label_smoothing,
      std::optional<int64_t> ignore_index, bool needs_grad_student, bool needs_grad_teacher) {
    return op_handle<op::KdBwd>().call(grad_loss, student, teacher, target, stats, temperature, ce_weight,
                                       kl_weight, label_smoothing, ignore_index, needs_grad_student,
                                       needs_grad_teacher);
  }
};

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
                               c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats] = op_handle<op::KdFwd>().call(student, teacher, target, temperature, ce_weight,
                                                     kl_weight, label_smoothing, ignore_index, reduction);
    ctx->save_for_backward({student, teacher, target.value_or(at::Tensor()), stats});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ce_weight"] = ce_weight;
    ctx->saved_data["kl_weight"] = kl_weight;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // stats never gets a gradient: allocate none
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(9);  // one per forward argument; undefined: no gradient
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const bool needs_student = ctx->needs_input_grad(0), needs_teacher = ctx->needs_input_grad(1);
    const std::optional<at::Tensor> target =
        saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const auto& d = ctx->saved_data;
    const std::optional<int64_t> ignore_index = d.at("ignore_index").toOptional<int64_t>();
    const c10::string_view reduction = d.at("reduction").toStringView();
    const int64_t N = saved[0].size(0);
    // With an ignore_index, "mean" divides by the rows that count (kd.h, reduce_kd_loss).
    const at::Tensor grad_loss =
        ignore_index && parse_reduction(reduction) == Reduction::kMean
            ? grads[0].div(kd_counted_rows(saved[2], *ignore_index, grads[0].scalar_type())).expand({N})
            : per_sample_grad(grads[0], reduction, N);
    std::tie(out[0], out[1]) = needed_only(
        as_variables(KdBwdOp::call(grad_loss, saved[0], saved[1], target, saved[3],
                                   d.at("temperature").toDouble(), d.at("ce_weight").toDouble(),
                                   d.at("kl_weight").toDouble(), d.at("label_smoothing").toDouble(),
                                   ignore_index, needs_student, needs_teacher)),
        needs_student, needs_teacher);
    if (target && target->is_floating_point() && ctx->needs_input_grad(2)) {
      out[2] = probability_target_grad(grad_loss, saved[0], saved[3], d.at("ce_weight").toDouble(),
                                       d.at("label_smoothing").toDouble());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> kd_fwd_autograd(const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& target,
                                                   double temperature, double ce_weight,
                                                   double kl_weight, double label_smoothing,
                                                   std::optional<int64_t> ignore_index,
                                                   c10::string_view reduction) {
  const variable_list out = KdFunction::apply(student, teacher, target, temperature, ce_weight,
                                              kl_weight, label_smoothing, ignore_index, reduction);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> kd_bwd_autograd(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& target, const at::Tensor& stats, double temperature,
    double ce_weight, double kl_weight, double label_smoothing, std::optional<int64_t> ignore_index,
    bool needs_grad_student, bool needs_grad_teacher) {
  const variable_list out = FirstOrderOnly<KdBwdOp>::apply(
      grad_loss, student, teacher, target, stats, temperature, ce_weight, kl_weight,
      label_smoothing, ignore_index, needs_grad_student, needs_grad_teacher);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, Autograd, m) {
  register_kernel<op::KdFwd>(m, &kd_fwd_autograd);
  register_kernel<op::KdBwd>(m, &kd_bwd_autograd);
}

}  // namespace agkd
