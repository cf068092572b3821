// CPU kernels of agkd::hybrid_fwd / agkd::hybrid_bwd (fused SSIM + cosine).
//
// The tile engine (plane_tiles.h) does the per-plane work; these functions check the call,
// run the (plane, row tile) items with at::parallel_for and finish each sample in a fixed
// order (math/hybrid.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "agkd/cpu/plane_tiles.h"
#include "agkd/hybrid.h"
#include "agkd/math/hybrid.h"
#include "agkd/math/ssim.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

template <typename scalar_t, bool kSSIM, bool kCos>
void hybrid_fwd_typed(const at::Tensor& x, const at::Tensor& y, const PlaneGeometry& g,
                      const HybridParams& p, at::Tensor& loss, at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> taps = gaussian_taps<acc_t>(g.window, p.sigma);
  const int64_t n_tiles = row_tiles(g);
  const int64_t n_items = g.N * g.C * n_tiles;
  std::vector<HybridSums> sums(n_items);
  const StridedMaps<scalar_t> xs(x), ys(y);
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    hybrid_fwd_tiles<scalar_t, kSSIM, kCos>(xs, ys, g, p, taps, n_tiles, begin, end,
                                            sums.data());
  });
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  acc_t* stats_out = stats.mutable_data_ptr<acc_t>();
  const int64_t per_sample = g.C * n_tiles;
  for (int64_t n = 0; n < g.N; ++n) {
    HybridSums total;
    for (int64_t i = n * per_sample; i < (n + 1) * per_sample; ++i) total += sums[i];
    finish_hybrid_sample(total, p.alpha, p.beta, p.eps, static_cast<double>(g.ssim_count()), 0.0,
                         loss_out + n, stats_out + n * kHybridStats);
  }
}

std::tuple<at::Tensor, at::Tensor> hybrid_fwd_cpu(const at::Tensor& x, const at::Tensor& y,
                                                  double alpha, double beta,
                                                  int64_t window_size, double sigma, double c1,
                                                  double c2, c10::string_view padding,
                                                  double eps, c10::string_view reduction) {
  const HybridParams p = make_params(alpha, beta, window_size, sigma, c1, c2, padding, eps);
  const Reduction r = parse_reduction(reduction);
  const PlaneGeometry g = make_geometry(x, y, p);
  auto [loss, stats] = per_sample_outputs(x, g.N, kHybridStats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hybrid_fwd_cpu", [&] {
    dispatch_terms</*kAllowNone=*/true>(alpha != 0, beta != 0, [&]<bool kSSIM, bool kCos>() {
      hybrid_fwd_typed<scalar_t, kSSIM, kCos>(x, y, g, p, loss, stats);
    });
  });
  return {reduce_loss(loss, r), stats};
}

template <typename scalar_t, bool kSSIM, bool kCos>
void hybrid_bwd_typed(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
                      const at::Tensor& stats, const PlaneGeometry& g, const HybridParams& p,
                      at::Tensor& grad_x, at::Tensor& grad_y) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> taps = gaussian_taps<acc_t>(g.window, p.sigma);
  const int64_t n_tiles = row_tiles(g);
  const StridedMaps<scalar_t> xs(x), ys(y);
  scalar_t* gx = grad_x.numel() ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gy = grad_y.numel() ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  const acc_t* st = stats.const_data_ptr<acc_t>();
  at::parallel_for(0, g.N * g.C * n_tiles, 1, [&](int64_t begin, int64_t end) {
    hybrid_bwd_tiles<scalar_t, kSSIM, kCos>(xs, ys, g, p, taps, gl, st, gx, gy, n_tiles, begin,
                                            end);
  });
}

std::tuple<at::Tensor, at::Tensor> hybrid_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& stats, double alpha, double beta, int64_t window_size, double sigma,
    double c1, double c2, c10::string_view padding, double eps, bool needs_grad_x,
    bool needs_grad_y) {
  const HybridParams p = make_params(alpha, beta, window_size, sigma, c1, c2, padding, eps);
  const PlaneGeometry g = make_geometry(x, y, p);
  HybridBackward b = prepare_hybrid_backward(grad_loss, stats, x, y, g, needs_grad_x, needs_grad_y);
  if (!b.needed) return {b.grad_a, b.grad_b};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hybrid_bwd_cpu", [&] {
    dispatch_terms</*kAllowNone=*/true>(alpha != 0, beta != 0, [&]<bool kSSIM, bool kCos>() {
      hybrid_bwd_typed<scalar_t, kSSIM, kCos>(b.grad_loss, x, y, b.stats, g, p, b.grad_a, b.grad_b);
    });
  });
  return {b.grad_a, b.grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CPU, m) {
  register_kernel<op::HybridFwd>(m, &hybrid_fwd_cpu);
  register_kernel<op::HybridBwd>(m, &hybrid_bwd_cpu);
}

}  // namespace agkd
