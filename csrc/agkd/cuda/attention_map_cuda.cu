// CUDA kernels of agkd::attention_map_fwd / agkd::attention_map_bwd, and of the min–max
// scaling of attention maps (agkd::minmax_scale_fwd / _bwd: one block per map, at the end).
//
// Forward: one thread per pixel sums mean_c |F|^p; one block per sample takes the norm
// (fixed-order block tree) and normalises. Backward: one block per sample forms
// ∂L/∂(mean_c |F|^p), then one thread per feature element writes the gradient, in the
// features' layout (NCHW, or channels_last).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "agkd/attention_map.h"
#include "agkd/cuda/attention_map_cuda.h"
#include "agkd/cuda/block_reduce.cuh"
#include "agkd/cuda/launch.cuh"
#include "agkd/math/attention.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

template <PowKind kKind, typename scalar_t>
__global__ void attention_sum_kernel(const scalar_t* __restrict__ f, const FeatureGeometry g,
                                     at::opmath_type<scalar_t> p,
                                     at::opmath_type<scalar_t>* __restrict__ a) {
  using acc_t = at::opmath_type<scalar_t>;
  AGKD_GRID_STRIDE(i, g.N * g.pixels()) {
    const int64_t n = i / g.pixels(), h = (i / g.W) % g.H, w = i % g.W;
    const scalar_t* px = f + n * g.sN + h * g.sH + w * g.sW;
    acc_t sum = 0;
    for (int64_t c = 0; c < g.C; ++c) sum += abs_pow<kKind>(static_cast<acc_t>(px[c * g.sC]), p);
    a[i] = sum / static_cast<acc_t>(g.C);
  }
}

template <typename scalar_t>
__global__ void attention_normalize_kernel(const at::opmath_type<scalar_t>* __restrict__ a,
                                           int64_t pixels, bool normalize,
                                           at::opmath_type<scalar_t> eps,
                                           scalar_t* __restrict__ out,
                                           at::opmath_type<scalar_t>* __restrict__ norms) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kFlatThreads];
  const int64_t n = blockIdx.x;
  const acc_t* an = a + n * pixels;
  acc_t sum_sq = 0;
  for (int64_t k = threadIdx.x; k < pixels; k += blockDim.x) sum_sq += an[k] * an[k];
  const acc_t norm = sqrt(block_reduce(sum_sq, scratch, SumOp{}));
  if (threadIdx.x == 0) norms[n] = norm;
  const acc_t scale = norm < eps ? eps : norm;
  for (int64_t k = threadIdx.x; k < pixels; k += blockDim.x) {
    out[n * pixels + k] = static_cast<scalar_t>(normalize ? an[k] / scale : an[k]);
  }
}

template <typename scalar_t>
__global__ void attention_grad_map_kernel(const scalar_t* __restrict__ grad_map,
                                          const scalar_t* __restrict__ map,
                                          const at::opmath_type<scalar_t>* __restrict__ norms,
                                          int64_t pixels, int64_t channels, bool normalize,
                                          at::opmath_type<scalar_t> eps,
                                          at::opmath_type<scalar_t>* __restrict__ grad_a) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kFlatThreads];
  const int64_t n = blockIdx.x;
  const scalar_t* gm = grad_map + n * pixels;
  const scalar_t* m = map + n * pixels;
  acc_t dot = 0;
  if (normalize) {
    for (int64_t k = threadIdx.x; k < pixels; k += blockDim.x) {
      dot += static_cast<acc_t>(m[k]) * static_cast<acc_t>(gm[k]);
    }
    dot = block_reduce(dot, scratch, SumOp{});
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(channels);
  const NormalizeGrad<acc_t> grad_of =
      normalize ? normalize_grad(dot, norms[n], eps, inv_c) : NormalizeGrad<acc_t>{acc_t(0), inv_c};
  for (int64_t k = threadIdx.x; k < pixels; k += blockDim.x) {
    grad_a[n * pixels + k] = grad_of(static_cast<acc_t>(gm[k]), static_cast<acc_t>(m[k]));
  }
}

// One thread per element of grad_f, in grad_f's memory order: NCHW, or NHWC (kPixelMajor)
// for channels_last features, whose gradient is channels_last too, so that neighbouring
// threads read and write neighbouring addresses in either layout.
template <PowKind kKind, bool kPixelMajor, typename scalar_t>
__global__ void attention_grad_features_kernel(const scalar_t* __restrict__ f, const FeatureGeometry g,
                                               const at::opmath_type<scalar_t>* __restrict__ grad_a,
                                               at::opmath_type<scalar_t> p,
                                               scalar_t* __restrict__ grad_f) {
  using acc_t = at::opmath_type<scalar_t>;
  AGKD_GRID_STRIDE(i, g.N * g.C * g.pixels()) {  // i: the memory index of grad_f
    int64_t n, c, h, w;
    if (kPixelMajor) {
      c = i % g.C, w = (i / g.C) % g.W, h = (i / (g.C * g.W)) % g.H, n = i / (g.C * g.pixels());
    } else {
      w = i % g.W, h = (i / g.W) % g.H, c = (i / g.pixels()) % g.C, n = i / (g.C * g.pixels());
    }
    const acc_t x = static_cast<acc_t>(f[n * g.sN + c * g.sC + h * g.sH + w * g.sW]);
    grad_f[i] = static_cast<scalar_t>(grad_a[n * g.pixels() + h * g.W + w] * abs_pow_grad<kKind>(x, p));
  }
}

std::tuple<at::Tensor, at::Tensor> attention_map_fwd_cuda(const at::Tensor& features, double p,
                                                          bool normalize, double eps) {
  const FeatureGeometry g = feature_geometry(features, p, eps);
  const c10::cuda::CUDAGuard guard(features.device());
  const auto acc = accumulate_dtype(features.scalar_type());
  at::Tensor out = at::empty({g.N, 1, g.H, g.W}, features.options());
  at::Tensor norms = at::empty({g.N}, features.options().dtype(acc));
  at::Tensor a = at::empty({g.N, g.pixels()}, features.options().dtype(acc));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "attention_map_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_pow(p, [&]<PowKind kKind>() {
      launch_kernel(attention_sum_kernel<kKind, scalar_t>, flat_blocks(g.N * g.pixels()), kFlatThreads,
                    0, stream, features.const_data_ptr<scalar_t>(), g, static_cast<acc_t>(p),
                    a.mutable_data_ptr<acc_t>());
    });
    launch_kernel(attention_normalize_kernel<scalar_t>, g.N, kFlatThreads, 0, stream,
                  a.const_data_ptr<acc_t>(), g.pixels(), normalize, static_cast<acc_t>(eps),
                  out.mutable_data_ptr<scalar_t>(), norms.mutable_data_ptr<acc_t>());
  });
  return {out, norms};
}

at::Tensor attention_map_bwd_cuda(const at::Tensor& grad_map, const at::Tensor& features,
                                  const at::Tensor& map, const at::Tensor& norms, double p,
                                  bool normalize, double eps) {
  const FeatureGeometry g = check_attention_backward_inputs(grad_map, features, map, norms, p, eps);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor gm = grad_map.contiguous().to(features.scalar_type());
  const at::Tensor m = map.contiguous(), nr = norms.contiguous();
  at::Tensor grad_f = g.walk_pixels()
                          ? at::empty(features.sizes(), features.options().memory_format(at::MemoryFormat::ChannelsLast))
                          : input_grad_or_empty(features, true);
  at::Tensor grad_a = at::empty({g.N, g.pixels()}, nr.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "attention_map_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(attention_grad_map_kernel<scalar_t>, g.N, kFlatThreads, 0, stream,
                  gm.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                  nr.const_data_ptr<acc_t>(), g.pixels(), g.C, normalize, static_cast<acc_t>(eps),
                  grad_a.mutable_data_ptr<acc_t>());
    dispatch_pow(p, [&]<PowKind kKind>() {
      dispatch_flag(g.walk_pixels(), [&]<bool kPixelMajor>() {
        launch_kernel(attention_grad_features_kernel<kKind, kPixelMajor, scalar_t>,
                      flat_blocks(g.N * g.C * g.pixels()), kFlatThreads, 0, stream,
                      features.const_data_ptr<scalar_t>(), g, grad_a.const_data_ptr<acc_t>(),
                      static_cast<acc_t>(p), grad_f.mutable_data_ptr<scalar_t>());
      });
    });
  });
  return grad_f;
}

// ------------------------------------------------------------------ min–max scaling

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> map_pixel(const scalar_t* map, const FeatureGeometry& g,
                                                               int64_t k) {
  return static_cast<at::opmath_type<scalar_t>>(map[(k / g.W) * g.sH + (k % g.W) * g.sW]);
}

template <typename scalar_t>
__global__ void minmax_scale_fwd_kernel(const scalar_t* __restrict__ maps, const FeatureGeometry g,
                                        at::opmath_type<scalar_t> eps, scalar_t* __restrict__ scaled,
                                        at::opmath_type<scalar_t>* __restrict__ range) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kFlatThreads];
  const int64_t i = blockIdx.x;
  const scalar_t* map = maps + (i / g.C) * g.sN + (i % g.C) * g.sC;
  acc_t lo = std::numeric_limits<acc_t>::infinity(), hi = -lo, nan = 0;
  for (int64_t k = threadIdx.x; k < g.pixels(); k += blockDim.x) {
    const acc_t x = map_pixel(map, g, k);
    if (x != x) nan = 1;
    lo = MinOp{}(lo, x), hi = MaxOp{}(hi, x);
  }
  lo = block_reduce(lo, scratch, MinOp{});
  hi = block_reduce(hi, scratch, MaxOp{});
  if (block_reduce(nan, scratch, MaxOp{}) > acc_t(0)) lo = hi = std::numeric_limits<acc_t>::quiet_NaN();
  const bool constant = minmax_constant(lo, hi, eps);
  for (int64_t k = threadIdx.x; k < g.pixels(); k += blockDim.x) {
    scaled[i * g.pixels() + k] = static_cast<scalar_t>(minmax_value(map_pixel(map, g, k), lo, hi, constant));
  }
  if (threadIdx.x == 0) range[2 * i] = lo, range[2 * i + 1] = hi;
}

template <typename scalar_t>
__global__ void minmax_scale_bwd_kernel(const scalar_t* __restrict__ grad_scaled, const scalar_t* __restrict__ maps,
                                        const FeatureGeometry g, const at::opmath_type<scalar_t>* __restrict__ range,
                                        at::opmath_type<scalar_t> eps, scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double scratch[kFlatThreads];
  const int64_t i = blockIdx.x;
  const scalar_t* map = maps + (i / g.C) * g.sN + (i % g.C) * g.sC;
  const scalar_t* up = grad_scaled + i * g.pixels();
  const acc_t lo = range[2 * i], hi = range[2 * i + 1];
  const bool constant = minmax_constant(lo, hi, eps);
  double sum_g = 0, sum_gs = 0, n_lo = 0, n_hi = 0;
  for (int64_t k = threadIdx.x; k < g.pixels(); k += blockDim.x) {
    const acc_t x = map_pixel(map, g, k);
    const double gk = static_cast<acc_t>(up[k]);
    sum_g += gk, sum_gs += gk * static_cast<double>(minmax_value(x, lo, hi, constant));
    n_lo += x == lo, n_hi += x == hi;
  }
  sum_g = block_reduce(sum_g, scratch, SumOp{});
  sum_gs = block_reduce(sum_gs, scratch, SumOp{});
  n_lo = block_reduce(n_lo, scratch, SumOp{});
  n_hi = block_reduce(n_hi, scratch, SumOp{});
  const MinmaxGrad<acc_t> grad_of = minmax_grad(lo, hi, eps, sum_g, sum_gs, n_lo, n_hi);
  for (int64_t k = threadIdx.x; k < g.pixels(); k += blockDim.x) {
    grad[i * g.pixels() + k] = static_cast<scalar_t>(grad_of(static_cast<acc_t>(up[k]), map_pixel(map, g, k)));
  }
}

}  // namespace

// Declared in cuda/attention_map_cuda.h for the attention alignment, which scales with them.
std::tuple<at::Tensor, at::Tensor> minmax_scale_fwd_cuda(const at::Tensor& maps, double eps) {
  const FeatureGeometry g = minmax_geometry(maps, eps, "minmax_scale_fwd");
  TORCH_CHECK(g.N * g.C < (int64_t{1} << 31), "agkd::minmax_scale_fwd (CUDA): too many maps");
  const c10::cuda::CUDAGuard guard(maps.device());
  at::Tensor scaled = at::empty(maps.sizes(), maps.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor range = at::empty({g.N, g.C, 2}, maps.options().dtype(accumulate_dtype(maps.scalar_type())));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "minmax_scale_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(minmax_scale_fwd_kernel<scalar_t>, static_cast<unsigned>(g.N * g.C), kFlatThreads, 0, stream,
                  maps.const_data_ptr<scalar_t>(), g, static_cast<acc_t>(eps), scaled.mutable_data_ptr<scalar_t>(),
                  range.mutable_data_ptr<acc_t>());
  });
  return {scaled, range};
}

at::Tensor minmax_scale_bwd_cuda(const at::Tensor& grad_scaled, const at::Tensor& maps, const at::Tensor& range,
                                 double eps) {
  const FeatureGeometry g = minmax_geometry(maps, eps, "minmax_scale_bwd");
  check_minmax_backward_inputs(grad_scaled, maps, range);
  TORCH_CHECK(g.N * g.C < (int64_t{1} << 31), "agkd::minmax_scale_bwd (CUDA): too many maps");
  const c10::cuda::CUDAGuard guard(maps.device());
  const at::Tensor gs = grad_scaled.contiguous().to(maps.scalar_type());
  const at::Tensor r = range.contiguous();
  at::Tensor grad = at::empty(maps.sizes(), maps.options().memory_format(at::MemoryFormat::Contiguous));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "minmax_scale_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(minmax_scale_bwd_kernel<scalar_t>, static_cast<unsigned>(g.N * g.C), kFlatThreads, 0, stream,
                  gs.const_data_ptr<scalar_t>(), maps.const_data_ptr<scalar_t>(), g, r.const_data_ptr<acc_t>(),
                  static_cast<acc_t>(eps), grad.mutable_data_ptr<scalar_t>());
  });
  return grad;
}

TORCH_LIBRARY_IMPL(agkd, CUDA, m) {
  register_kernel<op::AttentionMapFwd>(m, &attention_map_fwd_cuda);
  register_kernel<op::AttentionMapBwd>(m, &attention_map_bwd_cuda);
  register_kernel<op::MinmaxScaleFwd>(m, &minmax_scale_fwd_cuda);
  register_kernel<op::MinmaxScaleBwd>(m, &minmax_scale_bwd_cuda);
}

}  // namespace agkd
