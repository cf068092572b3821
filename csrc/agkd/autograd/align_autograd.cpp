// Autograd of agkd::align_fwd / agkd::align_bwd (schemas in ops.cpp; kernels in
// cpu/align_cpu.cpp and cuda/align_cuda.cu). The forward saves both maps (unscaled: the
// backward rescales them) and the cosine sums; the backward is one agkd::align_bwd call for
// both gradients.
#include <string>

#include "agkd/autograd/autograd.h"

namespace agkd {
namespace {

struct AlignBwdOp {
  static constexpr const char* kForwardName = op::AlignFwd::kName;
  static std::tuple<at::Tensor, at::Tensor> call(
      const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
      const at::Tensor& stats, double alpha, double beta, double gamma, int64_t window_size,
      double sigma, double c1, double c2, c10::string_view padding, double eps,
      bool align_corners, bool needs_grad_student, bool needs_grad_teacher, std::optional<double> minmax_eps) {
    return op_handle<op::AlignBwd>().call(grad_loss, student, teacher, stats, alpha, beta, gamma, window_size,
                                          sigma, c1, c2, padding, eps, align_corners, needs_grad_student,
                                          needs_grad_teacher, minmax_eps);
  }
};

class AlignFunction : public torch::autograd::Function<AlignFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student,
                               const at::Tensor& teacher, double alpha, double beta, double gamma,
                               int64_t window_size, double sigma, double c1, double c2,
                               c10::string_view padding, double eps, bool align_corners,
                               c10::string_view reduction, std::optional<double> minmax_eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats] = op_handle<op::AlignFwd>().call(student, teacher, alpha, beta, gamma, window_size, sigma,
                                                        c1, c2, padding, eps, align_corners, reduction, minmax_eps);
    ctx->save_for_backward({student, teacher, stats});
    SavedHybridTerms{alpha, beta, window_size, sigma, c1, c2, std::string(padding), eps}.save(ctx);
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["align_corners"] = align_corners;
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["minmax_eps"] = minmax_eps ? c10::IValue(*minmax_eps) : c10::IValue();
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // stats never gets a gradient: allocate none
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(14);  // one per forward argument; undefined: no gradient
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const bool needs_student = ctx->needs_input_grad(0), needs_teacher = ctx->needs_input_grad(1);
    const auto& d = ctx->saved_data;
    const SavedHybridTerms h = SavedHybridTerms::load(ctx);
    const at::Tensor grad_loss =
        per_sample_grad(grads[0], d.at("reduction").toStringView(), saved[0].size(0));
    std::tie(out[0], out[1]) = needed_only(
        as_variables(AlignBwdOp::call(grad_loss, saved[0], saved[1], saved[2], h.alpha, h.beta,
                                      d.at("gamma").toDouble(), h.window_size, h.sigma, h.c1, h.c2,
                                      h.padding, h.eps, d.at("align_corners").toBool(),
                                      needs_student, needs_teacher, d.at("minmax_eps").toOptional<double>())),
        needs_student, needs_teacher);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> align_fwd_autograd(
    const at::Tensor& student, const at::Tensor& teacher, double alpha, double beta, double gamma,
    int64_t window_size, double sigma, double c1, double c2, c10::string_view padding, double eps,
    bool align_corners, c10::string_view reduction, std::optional<double> minmax_eps) {
  const variable_list out = AlignFunction::apply(student, teacher, alpha, beta, gamma, window_size,
                                                 sigma, c1, c2, padding, eps, align_corners,
                                                 reduction, minmax_eps);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> align_bwd_autograd(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& stats, double alpha, double beta, double gamma, int64_t window_size,
    double sigma, double c1, double c2, c10::string_view padding, double eps, bool align_corners,
    bool needs_grad_student, bool needs_grad_teacher, std::optional<double> minmax_eps) {
  const variable_list out = FirstOrderOnly<AlignBwdOp>::apply(
      grad_loss, student, teacher, stats, alpha, beta, gamma, window_size, sigma, c1, c2, padding,
      eps, align_corners, needs_grad_student, needs_grad_teacher, minmax_eps);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, Autograd, m) {
  register_kernel<op::AlignFwd>(m, &align_fwd_autograd);
  register_kernel<op::AlignBwd>(m, &align_bwd_autograd);
}

}  // namespace agkd
