// What every op's autograd (autograd/<op>_autograd.cpp) shares.
//
// Each loss op registers a C++ torch::autograd::Function at the Autograd key, as
// torchvision does, so an eager call runs no Python between the public function and the
// kernels: the forward redispatches below autograd to the device kernel, the backward
// calls agkd::<op>_bwd through the dispatcher, and that backward op has a Function of its
// own whose only job is to refuse double backward.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <string>
#include <tuple>
#include <utility>

#include "agkd/host.h"
#include "agkd/ops.h"

namespace agkd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dispatcher's handle of `Op` (ops.h), typed by its signature; found once.
template <typename Op>
const c10::TypedOperatorHandle<typename Op::Signature>& op_handle() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow((std::string("agkd::") + Op::kName).c_str(), "")
                                 .template typed<typename Op::Signature>();
  return handle;
}

inline variable_list as_variables(const std::tuple<at::Tensor, at::Tensor>& pair) {
  return {std::get<0>(pair), std::get<1>(pair)};
}
inline variable_list as_variables(const at::Tensor& tensor) { return {tensor}; }
inline variable_list as_variables(variable_list tensors) { return tensors; }

// Autograd of a backward op: its forward is `BackwardOp::call` below autograd; its
// backward, reached only when a gradient is differentiated, raises NotImplementedError.
template <typename BackwardOp>
class FirstOrderOnly : public torch::autograd::Function<FirstOrderOnly<BackwardOp>> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext* /*ctx*/, Args&&... args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return as_variables(BackwardOp::call(std::forward<Args>(args)...));
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "agkd_ops: double backward (a gradient of a gradient) through agkd::",
                                BackwardOp::kForwardName,
                                " is not implemented; use agkd_ops.set_backend('reference') for it");
  }
};

// The per-sample gradient (N,) a loss backward op takes, from the gradient of the loss
// forward's output: as it is for reduction "none", spread over the N samples for "sum",
// and divided by N for "mean" (the numbers of ATen's SumBackward / MeanBackward).
inline at::Tensor per_sample_grad(const at::Tensor& grad, c10::string_view reduction, int64_t n) {
  switch (parse_reduction(reduction)) {
    case Reduction::kMean: return grad.div(n).expand({n});
    case Reduction::kSum: return grad.expand({n});
    default: return grad;
  }
}

// The SSIM and cosine terms' parameters, which hybrid_fwd and align_fwd share, kept in the
// autograd context for the backward.
struct SavedHybridTerms {
  double alpha, beta;
  int64_t window_size;
  double sigma, c1, c2;
  std::string padding;
  double eps;

  void save(AutogradContext* ctx) const {
    auto& d = ctx->saved_data;
    d["alpha"] = alpha, d["beta"] = beta, d["window_size"] = window_size, d["sigma"] = sigma;
    d["c1"] = c1, d["c2"] = c2, d["padding"] = padding, d["eps"] = eps;
  }

  static SavedHybridTerms load(const AutogradContext* ctx) {
    const auto& d = ctx->saved_data;
    return {d.at("alpha").toDouble(), d.at("beta").toDouble(), d.at("window_size").toInt(),
            d.at("sigma").toDouble(),  d.at("c1").toDouble(),   d.at("c2").toDouble(),
            d.at("padding").toStringRef(), d.at("eps").toDouble()};
  }
};

// The two gradients of a loss backward as the forward's inputs receive them: undefined
// where an input needs none.
inline std::pair<at::Tensor, at::Tensor> needed_only(const variable_list& grads, bool needs_first,
                                                     bool needs_second) {
  return {needs_first ? grads[0] : at::Tensor(), needs_second ? grads[1] : at::Tensor()};
}

}  // namespace agkd
