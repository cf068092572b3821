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

// The maps of agkd::minmax_scale_fwd/bwd: (N, C, H, W), any strides.
inline FeatureGeometry minmax_geometry(const at::Tensor& maps, double eps, const char* op) {
  TORCH_CHECK(maps.dim() == 4, "agkd::", op, ": maps must be (N, C, H, W), got ", shape_of(maps));
  TORCH_CHECK(maps.numel() > 0, "agkd::", op, ": empty maps ", shape_of(maps));
  TORCH_CHECK(eps >= 0, "agkd::", op, ": eps must be >= 0");
  return {maps.size(0), maps.size(1), maps.size(2), maps.size(3), maps.stride(0), maps.stride(1), maps.stride(2),
          maps.stride(3)};
}

inline void check_minmax_backward_inputs(const at::Tensor& grad, const at::Tensor& maps, const at::Tensor& range) {
  TORCH_CHECK(grad.sizes() == maps.sizes(), "agkd::minmax_scale_bwd: grad_scaled must have the maps' shape");
  TORCH_CHECK(range.dim() == 3 && range.size(0) == maps.size(0) && range.size(1) == maps.size(1) &&
                  range.size(2) == 2 && range.scalar_type() == accumulate_dtype(maps.scalar_type()),
              "agkd::minmax_scale_bwd: range must be (N, C, 2) of the accumulate dtype");
  TORCH_CHECK(grad.device() == maps.device() && range.device() == maps.device(),
              "agkd::minmax_scale_bwd: all inputs must be on the maps' device");
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
