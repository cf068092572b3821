// The CUDA implementations of agkd::minmax_scale_fwd / agkd::minmax_scale_bwd
// (cuda/attention_map_cuda.cu), for other CUDA kernels that compose them: the attention
// alignment's scaled form (align_cuda.cu, `minmax_eps`).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace agkd {

std::tuple<at::Tensor, at::Tensor> minmax_scale_fwd_cuda(const at::Tensor& maps, double eps);

at::Tensor minmax_scale_bwd_cuda(const at::Tensor& grad_scaled, const at::Tensor& maps, const at::Tensor& range,
                                 double eps);

}  // namespace agkd
