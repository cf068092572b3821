// Host-side checks of agkd::attention_map_fwd / agkd::attention_map_bwd (schemas in
// ops.cpp), shared by the CPU and CUDA implementations. The per-element math is in
// math/attention.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "agkd/host.h"
#include "agkd/math/attention.h"

namespace agkd {

struct FeatureGeometry {
  int64_t N, C, H, W;
  int64_t sN, sC, sH, sW;
  AGKD_HOST_DEVICE int64_t pixels() const { return H * W; }
  // Whether each channel plane is one dense run of H·W values (NCHW-contiguous planes).
  AGKD_HOST_DEVICE bool dense_planes() const { return sW == 1 && (sH == W || H == 1); }
  // Whether each pixel's C channels are one dense run and the pixels follow each other
  // (channels_last, NHWC): the channel mean is then a reduction along memory.
  AGKD_HOST_DEVICE bool dense_pixels() const { return sC == 1 && (sW == C || W == 1) && (sH == W * C || H == 1); }
  // The layout the kernels walk pixel by pixel: channels_last that is not also NCHW-dense
  // (a single channel, or a 1x1 map, is both, and keeps the plane walk).
  AGKD_HOST_DEVICE bool walk_pixels() const { return dense_pixels() && !dense_planes(); }
};

inline FeatureGeometry feature_geometry(const at::Tensor& f, double p, double eps) {
  TORCH_CHECK(f.dim() == 4, "agkd::attention_map: features must be (N, C, H, W), got ", shape_of(f));
  TORCH_CHECK(p > 0 && eps > 0, "agkd::attention_map: p and eps must be > 0");
  TORCH_CHECK(f.numel() > 0, "agkd::attention_map: empty features ", shape_of(f));
  return {f.size(0), f.size(1), f.size(2), f.size(3), f.stride(0), f.stride(1), f.stride(2),
          f.stride(3)};
}

inline FeatureGeometry check_attention_backward_inputs(const at::Tensor& grad_map,
                                                       const at::Tensor& features,
                                                       const at::Tensor& map,
                                                       const at::Tensor& norms, double p,
                                                       double eps) {
  const FeatureGeometry g = feature_geometry(features, p, eps);
  TORCH_CHECK(grad_map.sizes() == map.sizes() && map.dim() == 4 && map.size(0) == g.N &&
                  map.size(1) == 1 && map.size(2) == g.H && map.size(3) == g.W,
              "agkd::attention_map_bwd: grad_map and map must be (N, 1, H, W) of the features");
  TORCH_CHECK(norms.dim() == 1 && norms.size(0) == g.N &&
                  norms.scalar_type() == accumulate_dtype(features.scalar_type()),
              "agkd::attention_map_bwd: norms must be (N,) of the accumulate dtype");
  TORCH_CHECK(grad_map.device() == features.device() && map.device() == features.device() &&
                  norms.device() == features.device(),
              "agkd::attention_map_bwd: all inputs must be on the features' device");
  return g;
}

// Calls body.template operator()<kKind>() with the PowKind of exponent p (math/attention.h).
template <typename Body>
void dispatch_pow(double p, const Body& body) {
  switch (pow_kind(p)) {
    case PowKind::kSquare: body.template operator()<PowKind::kSquare>(); break;
    case PowKind::kAbs: body.template operator()<PowKind::kAbs>(); break;
    default: body.template operator()<PowKind::kGeneral>();
  }
}

}  // namespace agkd
