// The CUDA implementations of agkd::hybrid_fwd / agkd::hybrid_bwd (cuda/hybrid_cuda.cu),
// for other CUDA kernels that compose them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "agkd/hybrid.h"

namespace agkd {

std::tuple<at::Tensor, at::Tensor> hybrid_fwd_cuda(const at::Tensor& x, const at::Tensor& y,
                                                   double alpha, double beta,
                                                   int64_t window_size, double sigma,
                                                   double c1, double c2,
                                                   c10::string_view padding, double eps,
                                                   c10::string_view reduction);

std::tuple<at::Tensor, at::Tensor> hybrid_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& stats, double alpha, double beta, int64_t window_size, double sigma,
    double c1, double c2, c10::string_view padding, double eps, bool needs_grad_x,
    bool needs_grad_y);

// hybrid_bwd_cuda's kernels alone: the gradients of x and y written into b.grad_a and
// b.grad_b (as prepare_hybrid_backward made them), for inputs already checked.
void hybrid_bwd_cuda_into(HybridBackward& b, const at::Tensor& x, const at::Tensor& y, const PlaneGeometry& g,
                          const HybridParams& p);

}  // namespace agkd
