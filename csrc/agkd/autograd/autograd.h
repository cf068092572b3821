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

#include <tuple>
#include <utility>

#include "agkd/host.h"

namespace agkd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dispatcher's handle of an op ("agkd::kd_bwd"); callers keep it in a static.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

inline variable_list as_variables(const std::tuple<at::Tensor, at::Tensor>& pair) {
  return {std::get<0>(pair), std::get<1>(pair)};
}
inline variable_list as_variables(const at::Tensor& tensor) { return {tensor}; }

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

// The two gradients of a loss backward as the forward's inputs receive them: undefined
// where an input needs none.
inline std::pair<at::Tensor, at::Tensor> needed_only(const variable_list& grads, bool needs_first,
                                                     bool needs_second) {
  return {needs_first ? grads[0] : at::Tensor(), needs_second ? grads[1] : at::Tensor()};
}

}  // namespace agkd
