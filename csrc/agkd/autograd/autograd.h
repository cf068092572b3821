// What every op's autograd (autograd/<op>_autograd.cpp) shares.
//
// Each loss op registers a C++ torch::autograd::Function at the Autograd key, as
// torchvision does, so an eager call runs no Python between the public function and the
// kernels: the forward redispatches below autograd to the device kernel. The backward
// either calls agkd::<op>_bwd through the dispatcher (the attention ops, which recompute)
// or scales the gradients the forward wrote (the logit ops: scale_saved_grad); either way
// it runs through a Function whose only job is to refuse double backward.
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

// One gradient the forward wrote, as its input receives it: times the upstream gradient (a
// scalar, or one value per row for reduction "none"), in the input's dtype. A gradient the
// forward did not compute stays the empty tensor (an autograd output must be defined): it
// is the (0,) stand-in, where every computed gradient is 2-D.
inline at::Tensor scale_saved_grad(const at::Tensor& saved, const at::Tensor& grad_loss, const at::Tensor& like_input) {
  if (!saved.defined() || saved.dim() < 2) return saved;
  const at::Tensor g = grad_loss.to(saved.scalar_type());
  const at::Tensor scaled = g.dim() == 0 ? saved.mul(g) : saved.mul(g.unsqueeze(1));
  return scaled.to(like_input.scalar_type());
}

// Whether the saved gradient is already the answer: the upstream gradient is exactly 1
// (loss.backward() on the loss itself), the dtypes agree and no graph of the gradient is
// being built. Only looked at for real CPU tensors: reading a GPU value would synchronise,
// and a traced one (fake, functional: Python-dispatched) has no value to read.
inline bool upstream_is_one(const at::Tensor& saved, const at::Tensor& grad_loss, const at::Tensor& like_input) {
  return saved.defined() && saved.dim() == 2 && saved.device().is_cpu() && grad_loss.device().is_cpu() &&
         !grad_loss.unsafeGetTensorImpl()->is_python_dispatch() &&
         !saved.unsafeGetTensorImpl()->is_python_dispatch() &&
         saved.scalar_type() == like_input.scalar_type() && !at::GradMode::is_enabled() &&
         grad_loss.numel() > 0 && grad_loss.eq(1).all().item<bool>();
}

// FirstOrderOnly's op for the backward of a gradient-in-forward op: the saved gradients
// (up to three; an unused slot is the empty tensor) times the upstream one.
template <typename Op>
struct ScaleForwardGrads {
  static constexpr const char* kForwardName = Op::kName;
  static variable_list call(const at::Tensor& grad_loss, const at::Tensor& saved_a, const at::Tensor& like_a,
                            const at::Tensor& saved_b, const at::Tensor& like_b, const at::Tensor& saved_c,
                            const at::Tensor& like_c) {
    return {scale_saved_grad(saved_a, grad_loss, like_a), scale_saved_grad(saved_b, grad_loss, like_b),
            scale_saved_grad(saved_c, grad_loss, like_c)};
  }
};

// The backward of a gradient-in-forward op (the logit ops): each input that needs a
// gradient gets its saved one, as it is when the upstream gradient is exactly 1 (no pass
// over it; autograd can take it as .grad, since the context kept it with
// save_for_backward and frees it after the backward), else scaled. `saved`, `like`: the
// saved gradients and their inputs, three slots.
template <typename Op>
variable_list forward_grads_for_backward(const at::Tensor& grad_loss, const variable_list& saved,
                                         const variable_list& like, const std::vector<bool>& needs) {
  bool as_saved = true;
  for (size_t i = 0; i < needs.size(); ++i) as_saved = as_saved && (!needs[i] || upstream_is_one(saved[i], grad_loss, like[i]));
  variable_list out(needs.size());
  if (as_saved) {
    for (size_t i = 0; i < needs.size(); ++i) out[i] = needs[i] ? saved[i] : at::Tensor();
    return out;
  }
  // An autograd output must be defined: an unused slot is the (0,) stand-in.
  const auto slot = [&](const variable_list& v, size_t i) {
    return i < v.size() && v[i].defined() ? v[i] : at::empty({0}, grad_loss.options());
  };
  const variable_list scaled = FirstOrderOnly<ScaleForwardGrads<Op>>::apply(
      grad_loss, slot(saved, 0), slot(like, 0), slot(saved, 1), slot(like, 1), slot(saved, 2), slot(like, 2));
  for (size_t i = 0; i < needs.size(); ++i) out[i] = needs[i] ? scaled[i] : at::Tensor();
  return out;
}

// A differentiable input that asked for no gradient in the forward cannot get one now.
inline void check_computed(const char* op, const char* flag, bool needed, bool computed) {
  TORCH_CHECK(!needed || computed, "agkd::", op, ": a gradient is needed but the forward was called with ", flag,
              "=False; pass True where the input requires grad");
}

}  // namespace agkd
