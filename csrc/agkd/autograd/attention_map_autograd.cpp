// Autograd of agkd::attention_map_fwd / agkd::attention_map_bwd and of
// agkd::minmax_scale_fwd / _bwd (schemas in ops.cpp; kernels in cpu/attention_map_cpu.cpp
// and cuda/attention_map_cuda.cu). Each forward saves its input and what its backward
// needs (the map and its norms; each map's min and max); each backward is one call of the
// backward op.
#include "agkd/autograd/autograd.h"

namespace agkd {
namespace {

struct AttentionMapBwdOp {
  static constexpr const char* kForwardName = op::AttentionMapFwd::kName;
  static at::Tensor call(const at::Tensor& grad_map, const at::Tensor& features,
                         const at::Tensor& map, const at::Tensor& norm, double p, bool normalize,
                         double eps) {
    return op_handle<op::AttentionMapBwd>().call(grad_map, features, map, norm, p, normalize, eps);
  }
};

class AttentionMapFunction : public torch::autograd::Function<AttentionMapFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, double p,
                               bool normalize, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [map, norm] = op_handle<op::AttentionMapFwd>().call(features, p, normalize, eps);
    ctx->save_for_backward({features, map, norm});
    ctx->saved_data["p"] = p;
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({norm});
    ctx->set_materialize_grads(false);  // norm never gets a gradient: allocate none
    return {map, norm};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(4);  // one per forward argument; undefined: no gradient
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    out[0] = FirstOrderOnly<AttentionMapBwdOp>::apply(
        grads[0], saved[0], saved[1], saved[2], d.at("p").toDouble(),
        d.at("normalize").toBool(), d.at("eps").toDouble())[0];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_map_fwd_autograd(const at::Tensor& features, double p,
                                                              bool normalize, double eps) {
  const variable_list out = AttentionMapFunction::apply(features, p, normalize, eps);
  return {out[0], out[1]};
}

at::Tensor attention_map_bwd_autograd(const at::Tensor& grad_map, const at::Tensor& features,
                                      const at::Tensor& map, const at::Tensor& norm, double p,
                                      bool normalize, double eps) {
  return FirstOrderOnly<AttentionMapBwdOp>::apply(grad_map, features, map, norm, p, normalize,
                                                  eps)[0];
}

struct MinmaxScaleBwdOp {
  static constexpr const char* kForwardName = op::MinmaxScaleFwd::kName;
  static at::Tensor call(const at::Tensor& grad_scaled, const at::Tensor& maps, const at::Tensor& range, double eps) {
    return op_handle<op::MinmaxScaleBwd>().call(grad_scaled, maps, range, eps);
  }
};

class MinmaxScaleFunction : public torch::autograd::Function<MinmaxScaleFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& maps, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [scaled, range] = op_handle<op::MinmaxScaleFwd>().call(maps, eps);
    ctx->save_for_backward({maps, range});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({range});
    ctx->set_materialize_grads(false);
    return {scaled, range};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    out[0] = FirstOrderOnly<MinmaxScaleBwdOp>::apply(grads[0], saved[0], saved[1],
                                                     ctx->saved_data.at("eps").toDouble())[0];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> minmax_scale_fwd_autograd(const at::Tensor& maps, double eps) {
  const variable_list out = MinmaxScaleFunction::apply(maps, eps);
  return {out[0], out[1]};
}

at::Tensor minmax_scale_bwd_autograd(const at::Tensor& grad_scaled, const at::Tensor& maps, const at::Tensor& range,
                                     double eps) {
  return FirstOrderOnly<MinmaxScaleBwdOp>::apply(grad_scaled, maps, range, eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, Autograd, m) {
  register_kernel<op::MinmaxScaleFwd>(m, &minmax_scale_fwd_autograd);
  register_kernel<op::MinmaxScaleBwd>(m, &minmax_scale_bwd_autograd);
  register_kernel<op::AttentionMapFwd>(m, &attention_map_fwd_autograd);
  register_kernel<op::AttentionMapBwd>(m, &attention_map_bwd_autograd);
}

}  // namespace agkd
