// Host-side description of one hybrid (SSIM + cosine) call, shared by the CPU and CUDA
// implementations of agkd::hybrid_fwd / agkd::hybrid_bwd (schemas in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

#include "agkd/math/common.h"

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
                                double c1, double c2, const std::string& padding, double eps) {
  // The Python API validates with friendlier messages; these guard direct torch.ops calls.
  TORCH_CHECK(window_size >= 1 && window_size % 2 == 1,
              "agkd::hybrid: window_size must be odd and >= 1, got ", window_size);
  TORCH_CHECK(sigma > 0 && c1 > 0 && c2 > 0 && eps > 0,
              "agkd::hybrid: sigma, c1, c2 and eps must be > 0");
  return {alpha, beta, window_size, sigma, c1, c2, eps, parse_padding(padding)};
}

inline PlaneGeometry make_geometry(const at::Tensor& x, const at::Tensor& y,
                                   const HybridParams& p) {
  TORCH_CHECK(x.dim() == 4, "agkd::hybrid: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.sizes() == y.sizes(), "agkd::hybrid: x and y shapes differ: ", x.sizes(),
              " vs ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "agkd::hybrid: x and y dtypes differ");
  TORCH_CHECK(x.device() == y.device(), "agkd::hybrid: x and y are on different devices");
  PlaneGeometry g;
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.sample_planes = g.C;
  TORCH_CHECK(g.N > 0 && g.C > 0 && g.H > 0 && g.W > 0, "agkd::hybrid: empty input ",
              x.sizes());
  g.window = p.window_size;
  g.padding = p.padding;
  g.pad = pad_width(p.padding, p.window_size);
  if (p.alpha != 0.0) {
    if (p.padding == Padding::kValid) {
      TORCH_CHECK(g.H >= g.window && g.W >= g.window, "agkd::hybrid: padding='valid' needs H, W >= window_size (",
                  g.window, "), got ", x.sizes());
    } else if (p.padding == Padding::kReflect) {
      TORCH_CHECK(g.pad < g.H && g.pad < g.W, "agkd::hybrid: padding='reflect' needs window_size // 2 (",
                  g.pad, ") < H and W, got ", x.sizes());
    }
  }
  g.Ho = g.H + 2 * g.pad - g.window + 1;
  g.Wo = g.W + 2 * g.pad - g.window + 1;
  if (p.alpha == 0.0) {  // cosine only: the window plays no part
    g.pad = 0, g.window = 1, g.Ho = g.H, g.Wo = g.W;
  }
  return g;
}

// float32 for half/bfloat16/float32, float64 for float64: the dtype that kernels
// accumulate in and that the per-sample outputs carry.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// What agkd::hybrid_bwd receives besides the maps, as hybrid_fwd produced it.
inline void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& stats,
                                  const at::Tensor& x, const PlaneGeometry& g) {
  const auto acc = accumulate_dtype(x.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == g.N && grad_loss.scalar_type() == acc,
              "agkd::hybrid_bwd: grad_loss must be (N,) of the accumulate dtype");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == g.N && stats.size(1) == 3 &&
                  stats.scalar_type() == acc,
              "agkd::hybrid_bwd: stats must be (N, 3) of the accumulate dtype");
  TORCH_CHECK(grad_loss.device() == x.device() && stats.device() == x.device(),
              "agkd::hybrid_bwd: grad_loss and stats must be on x's device");
}

// A contiguous gradient for an input that needs one, an empty tensor (no work) otherwise.
inline at::Tensor input_grad_or_empty(const at::Tensor& like, bool needed) {
  return needed ? at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, like.options());
}

// agkd::align_fwd/bwd (attention alignment): the hybrid terms plus an MSE term, with the
// student resized bilinearly to the teacher's size.
struct AlignParams {
  HybridParams hybrid;
  double gamma;  // weight of the mean squared difference
  bool align_corners;
};

inline AlignParams make_align_params(double alpha, double beta, double gamma, int64_t window_size,
                                     double sigma, double c1, double c2, c10::string_view padding,
                                     double eps, bool align_corners) {
  return {make_params(alpha, beta, window_size, sigma, c1, c2, std::string(padding), eps), gamma,
          align_corners};
}

// Checks shared by align_fwd/bwd; returns the teacher's geometry.
inline PlaneGeometry align_geometry(const at::Tensor& student, const at::Tensor& teacher,
                             const HybridParams& p) {
  TORCH_CHECK(student.dim() == 4 && teacher.dim() == 4,
              "agkd::align: student and teacher must be (N, C, H, W)");
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(1) == teacher.size(1),
              "agkd::align: student and teacher batch/channels differ: ", student.sizes(), " vs ",
              teacher.sizes());
  TORCH_CHECK(student.numel() > 0, "agkd::align: empty student ", student.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type() &&
                  student.device() == teacher.device(),
              "agkd::align: student and teacher dtypes or devices differ");
  return make_geometry(teacher, teacher, p);
}

}  // namespace agkd
