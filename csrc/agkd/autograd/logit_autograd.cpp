// Autograd of the logit-KD family's ops (agkd::kd_family_fwd, dkd_fwd, ofa_fwd, dist_fwd;
// schemas in ops.cpp, kernels in cpu/logit_cpu.cpp). Their forward returns the gradients
// of its loss output with the loss (logit.h), so the forward saves those and the backward
// hands them over, scaled by the upstream gradient where it is not 1: no kernel runs in
// the backward (autograd.h, forward_grads_for_backward).
#include <ATen/ops/empty.h>

#include <optional>
#include <string>

#include "agkd/autograd/autograd.h"
#include "agkd/logit.h"

namespace agkd {
namespace {

// What every forward of this family keeps, with save_for_backward: its gradient outputs,
// and the inputs (for their dtypes, and so that a gradient taken with create_graph=True
// depends on them: its double backward is then FirstOrderOnly's clear error, not a
// silently missing term).
void save_forward_grads(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& like_a, const at::Tensor& b,
                        const at::Tensor& like_b, const at::Tensor& c = at::Tensor(),
                        const at::Tensor& like_c = at::Tensor()) {
  ctx->save_for_backward({a, b, c, like_a, like_b, like_c});
}

template <typename Op>
variable_list scaled_grads(AutogradContext* ctx, const at::Tensor& grad_loss, const std::vector<bool>& needs) {
  const variable_list v = ctx->get_saved_variables();
  return forward_grads_for_backward<Op>(grad_loss, {v[0], v[1], v[2]}, {v[3], v[4], v[5]}, needs);
}

// The forward and backward shared by the ops whose differentiable inputs are the two
// logit tensors (DKD, OFA, DIST): keep the gradients, then hand back the needed ones.
variable_list keep_pair_grads(AutogradContext* ctx, const std::tuple<at::Tensor, at::Tensor, at::Tensor>& outputs,
                              const at::Tensor& student, const at::Tensor& teacher, bool needs_grad_student,
                              bool needs_grad_teacher) {
  const auto& [loss, gs, gt] = outputs;
  save_forward_grads(ctx, gs, student, gt, teacher);
  ctx->saved_data["flags"] = std::vector<bool>{needs_grad_student, needs_grad_teacher};
  ctx->mark_non_differentiable({gs, gt});
  ctx->set_materialize_grads(false);
  return {loss, gs, gt};
}

template <typename Op>
variable_list pair_backward(AutogradContext* ctx, const variable_list& grads, size_t n_arguments) {
  variable_list out(n_arguments);  // one per forward argument; undefined: no gradient
  if (!grads[0].defined()) return out;
  const auto flags = ctx->saved_data.at("flags").toBoolList();
  check_computed(Op::kName, "needs_grad_student", ctx->needs_input_grad(0), flags.get(0));
  check_computed(Op::kName, "needs_grad_teacher", ctx->needs_input_grad(1), flags.get(1));
  const variable_list g = scaled_grads<Op>(ctx, grads[0], {ctx->needs_input_grad(0), ctx->needs_input_grad(1)});
  out[0] = g[0], out[1] = g[1];
  return out;
}

class KdFamilyFunction : public torch::autograd::Function<KdFamilyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& temperature, const std::optional<at::Tensor>& teacher_temperature,
                               bool standardize, double standardize_eps, c10::string_view reduction,
                               bool needs_grad_student, bool needs_grad_teacher, bool needs_grad_temperature) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, gs, gt, gtau] = op_handle<op::KdFamilyFwd>().call(
        student, teacher, temperature, teacher_temperature, standardize, standardize_eps, reduction,
        needs_grad_student, needs_grad_teacher, needs_grad_temperature);
    save_forward_grads(ctx, gs, student, gt, teacher, gtau, temperature);
    ctx->saved_data["flags"] = std::vector<bool>{needs_grad_student, needs_grad_teacher, needs_grad_temperature};
    ctx->mark_non_differentiable({gs, gt, gtau});
    ctx->set_materialize_grads(false);
    return {loss, gs, gt, gtau};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(10);  // one per forward argument; undefined: no gradient
    if (!grads[0].defined()) return out;
    const auto flags = ctx->saved_data.at("flags").toBoolList();
    check_computed(op::KdFamilyFwd::kName, "needs_grad_student", ctx->needs_input_grad(0), flags.get(0));
    check_computed(op::KdFamilyFwd::kName, "needs_grad_teacher", ctx->needs_input_grad(1), flags.get(1));
    check_computed(op::KdFamilyFwd::kName, "needs_grad_temperature", ctx->needs_input_grad(2), flags.get(2));
    const variable_list g = scaled_grads<op::KdFamilyFwd>(
        ctx, grads[0], {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)});
    out[0] = g[0], out[1] = g[1], out[2] = g[2];
    return out;
  }
};

// DKD and OFA share their argument layout up to the parameters: (student, teacher, target,
// params..., reduction, needs_grad_student, needs_grad_teacher).
template <typename Op, typename... Params>
class TargetLossFunction : public torch::autograd::Function<TargetLossFunction<Op, Params...>> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& target, Params... params, c10::string_view reduction,
                               bool needs_grad_student, bool needs_grad_teacher) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return keep_pair_grads(ctx, op_handle<Op>().call(student, teacher, target, params..., reduction,
                                                      needs_grad_student, needs_grad_teacher),
                           student, teacher, needs_grad_student, needs_grad_teacher);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    return pair_backward<Op>(ctx, grads, 6 + sizeof...(Params));
  }
};

using DkdFunction = TargetLossFunction<op::DkdFwd, double, double, double>;
using OfaFunction = TargetLossFunction<op::OfaFwd, double, double>;

class DistFunction : public torch::autograd::Function<DistFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature, double inter_weight, double intra_weight, double eps,
                               bool needs_grad_student, bool needs_grad_teacher) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return keep_pair_grads(ctx, op_handle<op::DistFwd>().call(student, teacher, temperature, inter_weight,
                                                               intra_weight, eps, needs_grad_student,
                                                               needs_grad_teacher),
                           student, teacher, needs_grad_student, needs_grad_teacher);
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    return pair_backward<op::DistFwd>(ctx, grads, 8);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_family_fwd_autograd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const std::optional<at::Tensor>& teacher_temperature, bool standardize, double standardize_eps,
    c10::string_view reduction, bool needs_grad_student, bool needs_grad_teacher, bool needs_grad_temperature) {
  const variable_list out = KdFamilyFunction::apply(student, teacher, temperature, teacher_temperature, standardize,
                                                    standardize_eps, reduction, needs_grad_student,
                                                    needs_grad_teacher, needs_grad_temperature);
  return {out[0], out[1], out[2], out[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_fwd_autograd(const at::Tensor& student,
                                                                const at::Tensor& teacher,
                                                                const at::Tensor& target, double temperature,
                                                                double tckd_weight, double nckd_weight,
                                                                c10::string_view reduction,
                                                                bool needs_grad_student, bool needs_grad_teacher) {
  const variable_list out = DkdFunction::apply(student, teacher, target, temperature, tckd_weight, nckd_weight,
                                               reduction, needs_grad_student, needs_grad_teacher);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ofa_fwd_autograd(const at::Tensor& student,
                                                                const at::Tensor& teacher,
                                                                const at::Tensor& target, double temperature,
                                                                double eps, c10::string_view reduction,
                                                                bool needs_grad_student, bool needs_grad_teacher) {
  const variable_list out = OfaFunction::apply(student, teacher, target, temperature, eps, reduction,
                                               needs_grad_student, needs_grad_teacher);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_fwd_autograd(const at::Tensor& student,
                                                                 const at::Tensor& teacher, double temperature,
                                                                 double inter_weight, double intra_weight,
                                                                 double eps, bool needs_grad_student,
                                                                 bool needs_grad_teacher) {
  const variable_list out = DistFunction::apply(student, teacher, temperature, inter_weight, intra_weight, eps,
                                                needs_grad_student, needs_grad_teacher);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, Autograd, m) {
  register_kernel<op::KdFamilyFwd>(m, &kd_family_fwd_autograd);
  register_kernel<op::DkdFwd>(m, &dkd_fwd_autograd);
  register_kernel<op::OfaFwd>(m, &ofa_fwd_autograd);
  register_kernel<op::DistFwd>(m, &dist_fwd_autograd);
}

}  // namespace agkd
