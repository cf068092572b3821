// CPU kernels of agkd::align_fwd / agkd::align_bwd (attention alignment).
//
// agkd::align_fwd / agkd::align_bwd compare a student map (N, C, h, w) with a teacher map
// (N, C, H, W) after resizing the student bilinearly to (H, W) exactly as F.interpolate
// does. The resized map never exists as a tensor: each task resamples one student plane
// into a per-thread buffer (H·W values, cache-resident at attention-map sizes) and runs
// that plane pair through the same tile code as hybrid_fwd/bwd, plus an MSE term. The
// backward resamples again, lets the tiles write the resampled plane's gradient into a
// second buffer, and scatters it onto the student's pixels in a fixed order (one thread
// per plane), so the result is deterministic without atomics. With `minmax_eps`, each
// plane of both maps is min–max scaled into a buffer first (cpu/minmax.h) and the tiles
// run on the buffers; the backward rescales and carries both gradients back through the
// scaling, plane by plane, so the scaled maps never exist as tensors either.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "agkd/align.h"
#include "agkd/cpu/minmax.h"
#include "agkd/cpu/plane_tiles.h"
#include "agkd/math/align.h"
#include "agkd/math/bilinear.h"
#include "agkd/math/hybrid.h"
#include "agkd/math/ssim.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

// Per teacher row and column: the two student rows/columns it reads and their weights.
template <typename acc_t>
struct BilinearPlan {
  int64_t h, w;  // student plane
  std::vector<LinearTap<acc_t>> rows, cols;
  BilinearPlan(int64_t h_, int64_t w_, int64_t H, int64_t W, bool align_corners) : h(h_), w(w_) {
    const acc_t sh = linear_scale<acc_t>(h, H, align_corners);
    const acc_t sw = linear_scale<acc_t>(w, W, align_corners);
    for (int64_t q = 0; q < H; ++q) rows.push_back(linear_tap(q, h, sh, align_corners));
    for (int64_t j = 0; j < W; ++j) cols.push_back(linear_tap(j, w, sw, align_corners));
  }
};

// The student plane at the teacher's size, row-major into `out` (rounded to scalar_t, as
// F.interpolate's result would be).
template <typename scalar_t, typename acc_t>
void resample_plane(const typename StridedMaps<scalar_t>::Plane& src,
                    const BilinearPlan<acc_t>& plan, scalar_t* out) {
  const int64_t W = static_cast<int64_t>(plan.cols.size());
  for (size_t q = 0; q < plan.rows.size(); ++q) {
    const LinearTap<acc_t> r = plan.rows[q];
    const scalar_t* top = src.row(r.i0);
    const scalar_t* bottom = src.row(r.i1);
    for (int64_t j = 0; j < W; ++j) {
      const LinearTap<acc_t> c = plan.cols[j];
      const acc_t t = c.w0 * static_cast<acc_t>(top[c.i0 * src.sW]) +
                      c.w1 * static_cast<acc_t>(top[c.i1 * src.sW]);
      const acc_t b = c.w0 * static_cast<acc_t>(bottom[c.i0 * src.sW]) +
                      c.w1 * static_cast<acc_t>(bottom[c.i1 * src.sW]);
      out[q * W + j] = static_cast<scalar_t>(r.w0 * t + r.w1 * b);
    }
  }
}

// The transpose of resample_plane: adds each resampled pixel's gradient to the four
// student pixels it was read from, in a fixed order. `grad` is h·w, zeroed by the caller.
template <typename scalar_t, typename acc_t>
void scatter_to_student(const scalar_t* grad_up, const BilinearPlan<acc_t>& plan, acc_t* grad) {
  const int64_t W = static_cast<int64_t>(plan.cols.size());
  for (size_t q = 0; q < plan.rows.size(); ++q) {
    const LinearTap<acc_t> r = plan.rows[q];
    acc_t* top = grad + r.i0 * plan.w;
    acc_t* bottom = grad + r.i1 * plan.w;
    for (int64_t j = 0; j < W; ++j) {
      const LinearTap<acc_t> c = plan.cols[j];
      const acc_t v = static_cast<acc_t>(grad_up[q * W + j]);
      top[c.i0] += r.w0 * c.w0 * v, top[c.i1] += r.w0 * c.w1 * v;
      bottom[c.i0] += r.w1 * c.w0 * v, bottom[c.i1] += r.w1 * c.w1 * v;
    }
  }
}

template <typename scalar_t>
double squared_distance(const scalar_t* up, const typename StridedMaps<scalar_t>::Plane& t,
                        int64_t H, int64_t W) {
  using acc_t = at::opmath_type<scalar_t>;
  double total = 0;
  for (int64_t q = 0; q < H; ++q) {
    const scalar_t* tr = t.row(q);
    acc_t row = 0;
    for (int64_t j = 0; j < W; ++j) {
      const acc_t d = static_cast<acc_t>(up[q * W + j]) - static_cast<acc_t>(tr[j * t.sW]);
      row += d * d;
    }
    total += row;
  }
  return total;
}

// One plane in its min–max scaled form (minmax_eps), in per-thread buffers: what the
// forward reads in place of the plane, and what the backward needs to carry a gradient
// back through the scaling.
template <typename scalar_t>
struct ScaledPlane {
  using acc_t = at::opmath_type<scalar_t>;
  using Plane = typename StridedMaps<scalar_t>::Plane;
  std::vector<acc_t> dense_buffer;  // the plane as one dense acc_t run, where it is not one already
  std::vector<scalar_t> values;     // the scaled plane, rows of w
  const acc_t* unscaled = nullptr;  // the plane, dense
  MinmaxRange<acc_t> range{};

  Plane scale(const Plane& p, int64_t h, int64_t w, acc_t eps) {
    unscaled = dense_plane(p.data, h, w, p.sH, p.sW, dense_buffer);
    range = minmax_range(unscaled, h * w);
    values.resize(h * w);
    minmax_write(unscaled, h * w, range, eps, values.data());
    return {values.data(), w, 1};
  }
  // The plane's gradient into `out` (h·w, dense) from `grad_scaled`, the scaled plane's;
  // `out` may be `grad_scaled` itself.
  void chain(const acc_t* grad_scaled, int64_t pixels, acc_t eps, scalar_t* out) const {
    minmax_chain(grad_scaled, unscaled, pixels, range, eps, out);
  }
};

// The teacher's geometry for one plane pair: what the tile code sees (the SSIM mean still
// runs over all of a sample's planes).
PlaneGeometry single_plane(PlaneGeometry g) {
  g.N = 1, g.C = 1;
  return g;
}

template <typename scalar_t, bool kSSIM, bool kCos>
void align_fwd_typed(const at::Tensor& student, const at::Tensor& teacher,
                     const PlaneGeometry& g, const AlignParams& a, at::Tensor& loss,
                     at::Tensor& stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> taps = gaussian_taps<acc_t>(g.window, a.hybrid.sigma);
  const int64_t h = student.size(2), w = student.size(3);
  const BilinearPlan<acc_t> plan(h, w, g.H, g.W, a.align_corners);
  const acc_t minmax_eps = static_cast<acc_t>(a.minmax_eps.value_or(0));
  const PlaneGeometry pg = single_plane(g);
  const int64_t n_tiles = row_tiles(g);
  const StridedMaps<scalar_t> ss(student), ts(teacher);
  std::vector<HybridSums> plane_sums(g.N * g.C);
  std::vector<double> plane_sq(g.N * g.C, 0.0);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> up(g.H * g.W);
    std::vector<HybridSums> tiles(n_tiles);
    ScaledPlane<scalar_t> s_scaled, t_scaled;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.C, c = plane % g.C;
      auto sp = ss.plane(n, c);
      auto tp = ts.plane(n, c);
      if (a.minmax_eps) sp = s_scaled.scale(sp, h, w, minmax_eps), tp = t_scaled.scale(tp, g.H, g.W, minmax_eps);
      resample_plane(sp, plan, up.data());
      const StridedMaps<scalar_t> xs(up.data(), g.W, 1), ys(tp.data, tp.sH, tp.sW);
      if constexpr (kSSIM || kCos) {
        hybrid_fwd_tiles<scalar_t, kSSIM, kCos>(xs, ys, pg, a.hybrid, taps, n_tiles, 0, n_tiles,
                                                tiles.data());
        HybridSums sum;
        for (const HybridSums& t : tiles) sum += t;
        plane_sums[plane] = sum;
      }
      if (a.gamma != 0) plane_sq[plane] = squared_distance(up.data(), tp, g.H, g.W);
    }
  });
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  acc_t* stats_out = stats.mutable_data_ptr<acc_t>();
  const double per_sample = static_cast<double>(g.C * g.H * g.W);  // pixels of the MSE term
  for (int64_t n = 0; n < g.N; ++n) {
    HybridSums total;
    double sq = 0;
    for (int64_t i = n * g.C; i < (n + 1) * g.C; ++i) {
      total += plane_sums[i];
      sq += plane_sq[i];
    }
    finish_hybrid_sample(total, a.hybrid.alpha, a.hybrid.beta, a.hybrid.eps,
                         static_cast<double>(g.ssim_count()), align_mse_term(a.gamma, sq, per_sample),
                         loss_out + n, stats_out + n * kHybridStats);
  }
}

template <typename scalar_t, bool kSSIM, bool kCos>
void align_bwd_typed(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& stats, const PlaneGeometry& g,
                     const AlignParams& a, at::Tensor& grad_s, at::Tensor& grad_t,
                     bool needs_s, bool needs_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> taps = gaussian_taps<acc_t>(g.window, a.hybrid.sigma);
  const int64_t h = student.size(2), w = student.size(3);
  const BilinearPlan<acc_t> plan(h, w, g.H, g.W, a.align_corners);
  const PlaneGeometry pg = single_plane(g);
  const int64_t n_tiles = row_tiles(g);
  const StridedMaps<scalar_t> ss(student), ts(teacher);
  const acc_t* gl = grad_loss.const_data_ptr<acc_t>();
  const acc_t* st = stats.const_data_ptr<acc_t>();
  scalar_t* gs = needs_s ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = needs_t ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t mse_scale = static_cast<acc_t>(align_mse_grad_scale(a.gamma, static_cast<double>(g.C * g.H * g.W)));
  const acc_t minmax_eps = static_cast<acc_t>(a.minmax_eps.value_or(0));
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> up(g.H * g.W), grad_up(needs_s ? g.H * g.W : 0);
    std::vector<acc_t> grad_plane(needs_s ? h * w : 0), grad_t_buffer;
    ScaledPlane<scalar_t> s_scaled, t_scaled;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.C, c = plane % g.C;
      auto sp = ss.plane(n, c);
      auto tp = ts.plane(n, c);
      if (a.minmax_eps) sp = s_scaled.scale(sp, h, w, minmax_eps), tp = t_scaled.scale(tp, g.H, g.W, minmax_eps);
      resample_plane(sp, plan, up.data());
      const StridedMaps<scalar_t> xs(up.data(), g.W, 1), ys(tp.data, tp.sH, tp.sW);
      scalar_t* gx = needs_s ? grad_up.data() : nullptr;
      scalar_t* gy = needs_t ? gt + plane * g.H * g.W : nullptr;
      constexpr bool kTiles = kSSIM || kCos;
      if constexpr (kTiles) {
        hybrid_bwd_tiles<scalar_t, kSSIM, kCos>(xs, ys, pg, a.hybrid, taps, gl + n, st + kHybridStats * n,
                                                gx, gy, n_tiles, 0, n_tiles);
      }
      if (a.gamma != 0 || !kTiles) {  // the MSE term, added to (or, alone, in place of) the tiles'
        const acc_t coeff = mse_scale * gl[n];
        for (int64_t q = 0; q < g.H; ++q) {
          const scalar_t* tr = tp.row(q);
          for (int64_t j = 0; j < g.W; ++j) {
            const int64_t k = q * g.W + j;
            const acc_t d = align_mse_grad(coeff, static_cast<acc_t>(up[k]), static_cast<acc_t>(tr[j * tp.sW]));
            if (gx) gx[k] = static_cast<scalar_t>((kTiles ? static_cast<acc_t>(gx[k]) : acc_t(0)) + d);
            if (gy) gy[k] = static_cast<scalar_t>((kTiles ? static_cast<acc_t>(gy[k]) : acc_t(0)) - d);
          }
        }
      }
      if (needs_s) {
        std::fill(grad_plane.begin(), grad_plane.end(), acc_t(0));
        scatter_to_student(grad_up.data(), plan, grad_plane.data());
        scalar_t* out = gs + plane * h * w;
        if (a.minmax_eps) {
          // Rounded to scalar_t first, as the gradient of the scaled map would be as a tensor.
          for (int64_t k = 0; k < h * w; ++k) grad_plane[k] = static_cast<acc_t>(static_cast<scalar_t>(grad_plane[k]));
          s_scaled.chain(grad_plane.data(), h * w, minmax_eps, out);
        } else {
          for (int64_t k = 0; k < h * w; ++k) out[k] = static_cast<scalar_t>(grad_plane[k]);
        }
      }
      if (needs_t && a.minmax_eps) {  // gy holds the scaled teacher plane's gradient: carry it back in place
        t_scaled.chain(dense_plane(gy, g.H, g.W, g.W, int64_t{1}, grad_t_buffer), g.H * g.W, minmax_eps, gy);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> align_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                 double alpha, double beta, double gamma,
                                                 int64_t window_size, double sigma, double c1,
                                                 double c2, c10::string_view padding, double eps,
                                                 bool align_corners, c10::string_view reduction,
                                                 std::optional<double> minmax_eps) {
  const AlignParams a = make_align_params(alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps,
                                          align_corners, minmax_eps);
  const Reduction r = parse_reduction(reduction);
  const PlaneGeometry g = align_geometry(student, teacher, a.hybrid);
  auto [loss, stats] = per_sample_outputs(student, g.N, kHybridStats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "align_fwd_cpu", [&] {
    dispatch_terms</*kAllowNone=*/true>(alpha != 0, beta != 0, [&]<bool kSSIM, bool kCos>() {
      align_fwd_typed<scalar_t, kSSIM, kCos>(student, teacher, g, a, loss, stats);
    });
  });
  return {reduce_loss(loss, r), stats};
}

std::tuple<at::Tensor, at::Tensor> align_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& stats, double alpha, double beta, double gamma, int64_t window_size,
    double sigma, double c1, double c2, c10::string_view padding, double eps, bool align_corners,
    bool needs_grad_student, bool needs_grad_teacher, std::optional<double> minmax_eps) {
  const AlignParams a = make_align_params(alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps,
                                          align_corners, minmax_eps);
  const PlaneGeometry g = align_geometry(student, teacher, a.hybrid);
  HybridBackward b = prepare_hybrid_backward(grad_loss, stats, student, teacher, g, needs_grad_student,
                                             needs_grad_teacher);
  if (!b.needed) return {b.grad_a, b.grad_b};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "align_bwd_cpu", [&] {
    dispatch_terms</*kAllowNone=*/true>(alpha != 0, beta != 0, [&]<bool kSSIM, bool kCos>() {
      align_bwd_typed<scalar_t, kSSIM, kCos>(b.grad_loss, student, teacher, b.stats, g, a, b.grad_a, b.grad_b,
                                             needs_grad_student, needs_grad_teacher);
    });
  });
  return {b.grad_a, b.grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CPU, m) {
  register_kernel<op::AlignFwd>(m, &align_fwd_cpu);
  register_kernel<op::AlignBwd>(m, &align_bwd_cpu);
}

}  // namespace agkd
