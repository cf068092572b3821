// CPU kernels of agkd::attention_map_fwd / agkd::attention_map_bwd, and of the min–max
// scaling of attention maps (agkd::minmax_scale_fwd / _bwd, at the end).
//
// One task per sample (at::parallel_for), so per-sample sums have a fixed order. The
// forward reads the features once, accumulating mean_c |F|^p into a per-sample buffer, then
// normalises; the backward reads the features once more and writes their gradient in the
// same sweep. Both walk the features in memory order: plane after plane for NCHW, and
// pixel after pixel, reducing along the channels, for channels_last (NHWC), whose
// gradient is channels_last too.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "agkd/attention_map.h"
#include "agkd/cpu/minmax.h"
#include "agkd/cpu/vectorize.h"
#include "agkd/math/attention.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

template <PowKind kKind, typename scalar_t>
AGKD_CPU_MULTIVERSION void attention_fwd_samples(const scalar_t* f, const FeatureGeometry& g,
                                                 double p, bool normalize, double eps,
                                                 int64_t begin, int64_t end, scalar_t* out,
                                                 at::opmath_type<scalar_t>* norms) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t pw = static_cast<acc_t>(p), inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  std::vector<acc_t> a(g.pixels());
  for (int64_t n = begin; n < end; ++n) {
    std::fill(a.begin(), a.end(), acc_t(0));
    if (g.walk_pixels()) {  // channels_last: each pixel's C values, summed along memory
      for (int64_t k = 0; k < g.pixels(); ++k) {
        const scalar_t* pixel = f + n * g.sN + k * g.C;
        acc_t sum = 0;
        AGKD_SIMD_REDUCTION(+ : sum)
        for (int64_t c = 0; c < g.C; ++c) sum += abs_pow<kKind>(static_cast<acc_t>(pixel[c]), pw);
        a[k] = sum;
      }
    }
    for (int64_t c = 0; !g.walk_pixels() && c < g.C; ++c) {
      const scalar_t* plane = f + n * g.sN + c * g.sC;
      if (g.dense_planes()) {  // one loop over the plane: 7x7 maps make short rows
        AGKD_SIMD
        for (int64_t k = 0; k < g.pixels(); ++k) a[k] += abs_pow<kKind>(static_cast<acc_t>(plane[k]), pw);
        continue;
      }
      for (int64_t h = 0; h < g.H; ++h) {
        const scalar_t* row = plane + h * g.sH;
        acc_t* acc = a.data() + h * g.W;
        for (int64_t w = 0; w < g.W; ++w) acc[w] += abs_pow<kKind>(static_cast<acc_t>(row[w * g.sW]), pw);
      }
    }
    double sum_sq = 0;
    for (int64_t k = 0; k < g.pixels(); ++k) {
      a[k] *= inv_c;
      sum_sq += static_cast<double>(a[k]) * a[k];
    }
    const acc_t norm = static_cast<acc_t>(std::sqrt(sum_sq));
    norms[n] = norm;
    // Divide as F.normalize does: by the norm clamped to eps (NaN stays NaN).
    const acc_t scale = norm < static_cast<acc_t>(eps) ? static_cast<acc_t>(eps) : norm;
    scalar_t* o = out + n * g.pixels();
    for (int64_t k = 0; k < g.pixels(); ++k) o[k] = static_cast<scalar_t>(normalize ? a[k] / scale : a[k]);
  }
}

std::tuple<at::Tensor, at::Tensor> attention_map_fwd_cpu(const at::Tensor& features, double p,
                                                         bool normalize, double eps) {
  const FeatureGeometry g = feature_geometry(features, p, eps);
  at::Tensor out = at::empty({g.N, 1, g.H, g.W}, features.options());
  at::Tensor norms = at::empty({g.N}, features.options().dtype(accumulate_dtype(features.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "attention_map_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    acc_t* nr = norms.mutable_data_ptr<acc_t>();
    dispatch_pow(p, [&]<PowKind kKind>() {
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        attention_fwd_samples<kKind>(f, g, p, normalize, eps, begin, end, o, nr);
      });
    });
  });
  return {out, norms};
}

template <PowKind kKind, typename scalar_t>
AGKD_CPU_MULTIVERSION void attention_bwd_samples(const scalar_t* grad_map, const scalar_t* map,
                                                 const at::opmath_type<scalar_t>* norms,
                                                 const scalar_t* f, const FeatureGeometry& g,
                                                 double p, bool normalize, double eps,
                                                 int64_t begin, int64_t end, scalar_t* grad_f) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t pw = static_cast<acc_t>(p), inv_c = acc_t(1) / static_cast<acc_t>(g.C);
  std::vector<acc_t> grad_a(g.pixels());
  for (int64_t n = begin; n < end; ++n) {
    const scalar_t* gm = grad_map + n * g.pixels();
    const scalar_t* m = map + n * g.pixels();
    double dot = 0;
    if (normalize) {
      AGKD_SIMD_REDUCTION(+ : dot)
      for (int64_t k = 0; k < g.pixels(); ++k) dot += static_cast<double>(m[k]) * static_cast<acc_t>(gm[k]);
    }
    const NormalizeGrad<acc_t> grad_of = normalize ? normalize_grad(static_cast<acc_t>(dot), norms[n],
                                                                    static_cast<acc_t>(eps), inv_c)
                                                   : NormalizeGrad<acc_t>{acc_t(0), inv_c};
    AGKD_SIMD
    for (int64_t k = 0; k < g.pixels(); ++k) grad_a[k] = grad_of(static_cast<acc_t>(gm[k]), static_cast<acc_t>(m[k]));
    if (g.walk_pixels()) {  // channels_last in, channels_last out
      for (int64_t k = 0; k < g.pixels(); ++k) {
        const scalar_t* pixel = f + n * g.sN + k * g.C;
        scalar_t* out = grad_f + (n * g.pixels() + k) * g.C;
        const acc_t ga = grad_a[k];
        AGKD_SIMD
        for (int64_t c = 0; c < g.C; ++c) {
          out[c] = static_cast<scalar_t>(ga * abs_pow_grad<kKind>(static_cast<acc_t>(pixel[c]), pw));
        }
      }
      continue;
    }
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* plane = f + n * g.sN + c * g.sC;
      scalar_t* out = grad_f + (n * g.C + c) * g.pixels();
      if (g.dense_planes()) {  // one vectorised loop over the plane, as in the forward
        AGKD_SIMD
        for (int64_t k = 0; k < g.pixels(); ++k) {
          out[k] = static_cast<scalar_t>(grad_a[k] * abs_pow_grad<kKind>(static_cast<acc_t>(plane[k]), pw));
        }
        continue;
      }
      for (int64_t h = 0; h < g.H; ++h) {
        const scalar_t* row = plane + h * g.sH;
        const acc_t* ga = grad_a.data() + h * g.W;
        scalar_t* o = out + h * g.W;
        for (int64_t w = 0; w < g.W; ++w) {
          o[w] = static_cast<scalar_t>(ga[w] * abs_pow_grad<kKind>(static_cast<acc_t>(row[w * g.sW]), pw));
        }
      }
    }
  }
}

at::Tensor attention_map_bwd_cpu(const at::Tensor& grad_map, const at::Tensor& features,
                                 const at::Tensor& map, const at::Tensor& norms, double p,
                                 bool normalize, double eps) {
  const FeatureGeometry g = check_attention_backward_inputs(grad_map, features, map, norms, p, eps);
  const at::Tensor gm = grad_map.contiguous().to(features.scalar_type());
  const at::Tensor m = map.contiguous(), nr = norms.contiguous();
  // The gradient in the features' layout: channels_last for channels_last features (what
  // the convolution that made them wants back), contiguous otherwise.
  at::Tensor grad_f = g.walk_pixels()
                          ? at::empty(features.sizes(), features.options().memory_format(at::MemoryFormat::ChannelsLast))
                          : input_grad_or_empty(features, true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "attention_map_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gmp = gm.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const acc_t* np = nr.const_data_ptr<acc_t>();
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    scalar_t* gf = grad_f.mutable_data_ptr<scalar_t>();
    dispatch_pow(p, [&]<PowKind kKind>() {
      at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
        attention_bwd_samples<kKind>(gmp, mp, np, f, g, p, normalize, eps, begin, end, gf);
      });
    });
  });
  return grad_f;
}

// ------------------------------------------------------------------ min–max scaling
//
// One task per group of maps; a map (one sample's channel) is small (an attention map of
// a few hundred pixels), so each is walked whole, as a dense run: the forward once for its
// min and max and once to write it scaled; the backward once for its sums and once to
// write the gradient.

// A map's pixels as a dense run of H·W values (cpu/minmax.h).
template <typename scalar_t>
AGKD_CPU_INLINE const at::opmath_type<scalar_t>* dense_map(const scalar_t* map, const FeatureGeometry& g,
                                                           std::vector<at::opmath_type<scalar_t>>& buffer) {
  return dense_plane(map, g.H, g.W, g.sH, g.sW, buffer);
}

constexpr int64_t kPixelsPerTask = 16384;

template <typename scalar_t>
AGKD_CPU_MULTIVERSION void minmax_fwd_maps(const scalar_t* in, const FeatureGeometry& g, at::opmath_type<scalar_t> eps,
                                           int64_t begin, int64_t end, scalar_t* out, at::opmath_type<scalar_t>* range) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> buffer;
  const int64_t P = g.pixels();
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* m = dense_map(in + (i / g.C) * g.sN + (i % g.C) * g.sC, g, buffer);
    const MinmaxRange<acc_t> r = minmax_range(m, P);
    minmax_write(m, P, r, eps, out + i * P);
    range[2 * i] = r.lo, range[2 * i + 1] = r.hi;
  }
}

std::tuple<at::Tensor, at::Tensor> minmax_scale_fwd_cpu(const at::Tensor& maps, double eps) {
  const FeatureGeometry g = minmax_geometry(maps, eps, "minmax_scale_fwd");
  at::Tensor scaled = at::empty(maps.sizes(), maps.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor range = at::empty({g.N, g.C, 2}, maps.options().dtype(accumulate_dtype(maps.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "minmax_scale_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = maps.const_data_ptr<scalar_t>();
    scalar_t* out = scaled.mutable_data_ptr<scalar_t>();
    acc_t* r = range.mutable_data_ptr<acc_t>();
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kPixelsPerTask / g.pixels()), [&](int64_t begin, int64_t end) {
      minmax_fwd_maps(in, g, static_cast<acc_t>(eps), begin, end, out, r);
    });
  });
  return {scaled, range};
}

template <typename scalar_t>
AGKD_CPU_MULTIVERSION void minmax_bwd_maps(const scalar_t* up, const scalar_t* in, const FeatureGeometry& g,
                                           const at::opmath_type<scalar_t>* range, at::opmath_type<scalar_t> eps,
                                           int64_t begin, int64_t end, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> buffer, up_buffer;
  const int64_t P = g.pixels();
  const FeatureGeometry dense{g.N, g.C, g.H, g.W, g.C * P, P, g.W, 1};  // the upstream gradient's layout
  for (int64_t i = begin; i < end; ++i) {
    const acc_t* m = dense_map(in + (i / g.C) * g.sN + (i % g.C) * g.sC, g, buffer);
    const acc_t* u = dense_map(up + i * P, dense, up_buffer);
    minmax_chain(u, m, P, MinmaxRange<acc_t>{range[2 * i], range[2 * i + 1]}, eps, out + i * P);
  }
}

at::Tensor minmax_scale_bwd_cpu(const at::Tensor& grad_scaled, const at::Tensor& maps, const at::Tensor& range,
                                double eps) {
  const FeatureGeometry g = minmax_geometry(maps, eps, "minmax_scale_bwd");
  check_minmax_backward_inputs(grad_scaled, maps, range);
  const at::Tensor gs = grad_scaled.contiguous().to(maps.scalar_type());
  const at::Tensor r = range.contiguous();
  at::Tensor grad = at::empty(maps.sizes(), maps.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "minmax_scale_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = maps.const_data_ptr<scalar_t>();
    const scalar_t* up = gs.const_data_ptr<scalar_t>();
    const acc_t* rp = r.const_data_ptr<acc_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kPixelsPerTask / g.pixels()), [&](int64_t begin, int64_t end) {
      minmax_bwd_maps(up, in, g, rp, static_cast<acc_t>(eps), begin, end, out);
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CPU, m) {
  register_kernel<op::AttentionMapFwd>(m, &attention_map_fwd_cpu);
  register_kernel<op::AttentionMapBwd>(m, &attention_map_bwd_cpu);
  register_kernel<op::MinmaxScaleFwd>(m, &minmax_scale_fwd_cpu);
  register_kernel<op::MinmaxScaleBwd>(m, &minmax_scale_bwd_cpu);
}

}  // namespace agkd
