// Host-side description of one hybrid (SSIM + cosine) call, shared by the CPU and CUDA
// implementations of agkd::hybrid_fwd / agkd::hybrid_bwd (schemas in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "agkd/host.h"
#include "agkd/math/common.h"
#include "agkd/math/hybrid.h"

namespace agkd {

struct HybridParams {
  double alpha;  // weight of (1 - SSIM); 0 skips the SSIM work entirely
  double beta;   // weight of (1 - cos); 0 skips the cosine work entirely
  int64_t window_size;
  double sigma, c1, c2, eps;
  Padding padding;
};

struct PlaneGeometry {
  int64_t N, C, H, W;  // source maps
  int64_t Ho, Wo;      // SSIM map (output positions)
  int64_t pad;         // border the window adds on each side
  int64_t window;
  Padding padding;
  int64_t sample_planes;  // planes per sample: C, also when the tiles see one plane at a time
  int64_t padded_width() const { return Wo + window - 1; }
  int64_t ssim_count() const { return sample_planes * Ho * Wo; }  // SSIM values averaged per sample
};

inline Padding parse_padding(const std::string& name) {
  if (name == "valid") return Padding::kValid;
  if (name == "reflect") return Padding::kReflect;
  if (name == "zeros") return Padding::kZeros;
  TORCH_CHECK(false, "agkd::hybrid: unknown padding '", name, "' (valid, reflect, zeros)");
}

inline HybridParams make_params(double alpha, double beta, int64_t window_size, double sigma,
                                double c1, double c2, c10::string_view padding, double eps) {
  // The Python API validates with friendlier messages; these guard direct torch.ops calls.
  TORCH_CHECK(window_size >= 1 && window_size % 2 == 1,
              "agkd::hybrid: window_size must be odd and >= 1, got ", std::to_string(window_size));
  TORCH_CHECK(sigma > 0 && c1 > 0 && c2 > 0 && eps > 0,
              "agkd::hybrid: sigma, c1, c2 and eps must be > 0");
  return {alpha, beta, window_size, sigma, c1, c2, eps, parse_padding(std::string(padding))};
}

inline PlaneGeometry make_geometry(const at::Tensor& x, const at::Tensor& y,
                                   const HybridParams& p) {
  TORCH_CHECK(x.dim() == 4, "agkd::hybrid: x must be (N, C, H, W), got ", shape_of(x));
  TORCH_CHECK(x.sizes() == y.sizes(), "agkd::hybrid: x and y shapes differ: ", shape_of(x), " vs ", shape_of(y));
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "agkd::hybrid: x and y dtypes differ");
  TORCH_CHECK(x.device() == y.device(), "agkd::hybrid: x and y are on different devices");
  PlaneGeometry g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.sample_planes = g.C;
  TORCH_CHECK(g.N > 0 && g.C > 0 && g.H > 0 && g.W > 0, "agkd::hybrid: empty input ", shape_of(x));
  g.window = p.window_size;
  g.padding = p.padding;
  g.pad = pad_width(p.padding, p.window_size);
  if (p.alpha != 0.0) {
    if (p.padding == Padding::kValid) {
      TORCH_CHECK(g.H >= g.window && g.W >= g.window, "agkd::hybrid: padding='valid' needs H, W >= window_size (",
                  std::to_string(g.window), "), got ", shape_of(x));
    } else if (p.padding == Padding::kReflect) {
      TORCH_CHECK(g.pad < g.H && g.pad < g.W, "agkd::hybrid: padding='reflect' needs window_size // 2 (",
                  std::to_string(g.pad), ") < H and W, got ", shape_of(x));
    }
  }
  g.Ho = g.H + 2 * g.pad - g.window + 1;
  g.Wo = g.W + 2 * g.pad - g.window + 1;
  if (p.alpha == 0.0) {  // cosine only: the window plays no part
    g.pad = 0, g.window = 1, g.Ho = g.H, g.Wo = g.W;
  }
  return g;
}

// What a backward of the hybrid terms (agkd::hybrid_bwd, agkd::align_bwd) works with once
// its inputs are checked: contiguous grad_loss and stats, and its two outputs.
struct HybridBackward {
  at::Tensor grad_loss, stats;  // contiguous
  at::Tensor grad_a, grad_b;    // contiguous gradients, or empty tensors where not needed
  bool needed;                  // whether either gradient is
};

// `g` is the geometry of `b` (y, or the teacher for align), whose device and dtype the
// outputs of the forward share.
inline HybridBackward prepare_hybrid_backward(const at::Tensor& grad_loss, const at::Tensor& stats,
                                              const at::Tensor& a, const at::Tensor& b,
                                              const PlaneGeometry& g, bool needs_a, bool needs_b) {
  check_backward_inputs("agkd::hybrid_bwd", grad_loss, stats, b, g.N, kHybridStats);
  return {grad_loss.contiguous(), stats.contiguous(), input_grad_or_empty(a, needs_a),
          input_grad_or_empty(b, needs_b), needs_a || needs_b};
}

}  // namespace agkd
