// Autograd of agkd::hybrid_fwd / agkd::hybrid_bwd (schemas in ops.cpp; kernels in
// cpu/hybrid_cpu.cpp and cuda/hybrid_cuda.cu). The forward saves both maps and the cosine
// sums; the backward is one agkd::hybrid_bwd call for both gradients.
#include <string>

#include "agkd/autograd/autograd.h"

namespace agkd {
namespace {

struct HybridBwdOp {
  static constexpr const char* kForwardName = op::HybridFwd::kName;
  static std::tuple<at::Tensor, at::Tensor> call(
      const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
      const at::Tensor& stats, double alpha, double beta, int64_t window_size, double sigma,
      double c1, double c2, c10::string_view padding, double eps, bool needs_grad_x,
      bool needs_grad_y) {
    return op_handle<op::HybridBwd>().call(grad_loss, x, y, stats, alpha, beta, window_size, sigma, c1, c2,
                                           padding, eps, needs_grad_x, needs_grad_y);
  }
};

class HybridFunction : public torch::autograd::Function<HybridFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& y,
                               double alpha, double beta, int64_t window_size, double sigma,
                               double c1, double c2, c10::string_view padding, double eps,
                               c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, stats] =
        op_handle<op::HybridFwd>().call(x, y, alpha, beta, window_size, sigma, c1, c2, padding, eps, reduction);
    ctx->save_for_backward({x, y, stats});
    SavedHybridTerms{alpha, beta, window_size, sigma, c1, c2, std::string(padding), eps}.save(ctx);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->mark_non_differentiable({stats});
    ctx->set_materialize_grads(false);  // stats never gets a gradient: allocate none
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(11);  // one per forward argument; undefined: no gradient
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const bool needs_x = ctx->needs_input_grad(0), needs_y = ctx->needs_input_grad(1);
    const SavedHybridTerms h = SavedHybridTerms::load(ctx);
    const at::Tensor grad_loss =
        per_sample_grad(grads[0], ctx->saved_data.at("reduction").toStringView(), saved[0].size(0));
    std::tie(out[0], out[1]) = needed_only(
        as_variables(HybridBwdOp::call(grad_loss, saved[0], saved[1], saved[2], h.alpha, h.beta,
                                       h.window_size, h.sigma, h.c1, h.c2, h.padding, h.eps, needs_x,
                                       needs_y)),
        needs_x, needs_y);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> hybrid_fwd_autograd(const at::Tensor& x, const at::Tensor& y,
                                                       double alpha, double beta,
                                                       int64_t window_size, double sigma,
                                                       double c1, double c2,
                                                       c10::string_view padding, double eps,
                                                       c10::string_view reduction) {
  const variable_list out = HybridFunction::apply(x, y, alpha, beta, window_size, sigma, c1, c2,
                                                  padding, eps, reduction);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> hybrid_bwd_autograd(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& stats, double alpha, double beta, int64_t window_size, double sigma,
    double c1, double c2, c10::string_view padding, double eps, bool needs_grad_x,
    bool needs_grad_y) {
  const variable_list out = FirstOrderOnly<HybridBwdOp>::apply(
      grad_loss, x, y, stats, alpha, beta, window_size, sigma, c1, c2, padding, eps,
      needs_grad_x, needs_grad_y);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, Autograd, m) {
  register_kernel<op::HybridFwd>(m, &hybrid_fwd_autograd);
  register_kernel<op::HybridBwd>(m, &hybrid_bwd_autograd);
}

}  // namespace agkd
