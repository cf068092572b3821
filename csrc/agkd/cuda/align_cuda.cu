// CUDA kernels of agkd::align_fwd / agkd::align_bwd (attention alignment).
//
// Unlike the CPU kernels, which resample one plane at a time into a cache-resident buffer
// and never store the resized map, the CUDA path resamples the student into a
// teacher-sized scratch tensor and runs the hybrid kernels (hybrid_cuda.cu) on it; the
// backward gathers the resampled gradient back onto the student's pixels (each student
// pixel sums the teacher pixels that read it, in a fixed order: deterministic, no
// atomics). Why materialise here: docs/design.md, section 1 (align). The interpolation weights are
// math/bilinear.h's, the same as the CPU's and F.interpolate's. With `minmax_eps`, both maps
// are min–max scaled first by minmax_scale_fwd's kernel (one block per map), and both
// gradients carried back through the scaling by minmax_scale_bwd's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "agkd/align.h"
#include "agkd/cuda/attention_map_cuda.h"
#include "agkd/cuda/block_reduce.cuh"
#include "agkd/cuda/hybrid_cuda.h"
#include "agkd/cuda/launch.cuh"
#include "agkd/math/align.h"
#include "agkd/math/bilinear.h"
#include "agkd/math/hybrid.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

// Interpolation taps along one axis, for the device: per destination index (i0, i1, w0,
// w1), and per source index the first and last destination that reads it (the gather).
template <typename acc_t>
struct AxisTaps {
  const LinearTap<acc_t>* taps;  // [dst]
  const int64_t* first;          // [src]
  const int64_t* last;           // [src], < first where no destination reads src
};

// Host tables for one axis, packed into one byte tensor on the device.
template <typename acc_t>
at::Tensor axis_table(int64_t src, int64_t dst, bool align_corners, const at::Tensor& like) {
  std::vector<LinearTap<acc_t>> taps;
  std::vector<int64_t> first(src, dst), last(src, -1);
  const acc_t scale = linear_scale<acc_t>(src, dst, align_corners);
  for (int64_t d = 0; d < dst; ++d) {
    const LinearTap<acc_t> t = linear_tap(d, src, scale, align_corners);
    taps.push_back(t);
    const int64_t read[2] = {t.i0, t.i1};
    for (const int64_t s : read) first[s] = std::min(first[s], d), last[s] = std::max(last[s], d);
  }
  const size_t tap_bytes = taps.size() * sizeof(LinearTap<acc_t>);
  const size_t range_bytes = src * sizeof(int64_t);
  // Pinned, so the copy below is asynchronous: from pageable memory it would wait for the
  // stream to drain, a device sync on every call. (The emulator's tensors stay on the CPU.)
  at::Tensor host = at::empty({static_cast<int64_t>(tap_bytes + 2 * range_bytes)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(like.is_cuda()));
  uint8_t* bytes = host.mutable_data_ptr<uint8_t>();
  std::memcpy(bytes, taps.data(), tap_bytes);
  std::memcpy(bytes + tap_bytes, first.data(), range_bytes);
  std::memcpy(bytes + tap_bytes + range_bytes, last.data(), range_bytes);
  return host.to(at::TensorOptions().dtype(at::kByte).device(like.device()), /*non_blocking=*/true);
}

template <typename acc_t>
AxisTaps<acc_t> axis_taps(const at::Tensor& table, int64_t src, int64_t dst) {
  const uint8_t* bytes = table.const_data_ptr<uint8_t>();
  const size_t tap_bytes = dst * sizeof(LinearTap<acc_t>);
  return {reinterpret_cast<const LinearTap<acc_t>*>(bytes),
          reinterpret_cast<const int64_t*>(bytes + tap_bytes),
          reinterpret_cast<const int64_t*>(bytes + tap_bytes + src * sizeof(int64_t))};
}

struct Dims {
  int64_t N, C, h, w, H, W;
  int64_t s_strides[4];  // student
  int64_t t_strides[4];  // teacher
};

template <typename scalar_t>
__global__ void resample_kernel(const scalar_t* __restrict__ student, const Dims d,
                                AxisTaps<at::opmath_type<scalar_t>> rows,
                                AxisTaps<at::opmath_type<scalar_t>> cols, scalar_t* __restrict__ up) {
  using acc_t = at::opmath_type<scalar_t>;
  AGKD_GRID_STRIDE(i, d.N * d.C * d.H * d.W) {
    const int64_t j = i % d.W, q = (i / d.W) % d.H, c = (i / (d.H * d.W)) % d.C;
    const int64_t n = i / (d.C * d.H * d.W);
    const LinearTap<acc_t> r = rows.taps[q], k = cols.taps[j];
    const scalar_t* plane = student + n * d.s_strides[0] + c * d.s_strides[1];
    auto at = [&](int64_t y, int64_t x) {
      return static_cast<acc_t>(plane[y * d.s_strides[2] + x * d.s_strides[3]]);
    };
    const acc_t top = k.w0 * at(r.i0, k.i0) + k.w1 * at(r.i0, k.i1);
    const acc_t bottom = k.w0 * at(r.i1, k.i0) + k.w1 * at(r.i1, k.i1);
    up[i] = static_cast<scalar_t>(r.w0 * top + r.w1 * bottom);
  }
}

// The weight with which destination `dst` reads source `src` along one axis.
template <typename acc_t>
__device__ __forceinline__ acc_t tap_weight(const LinearTap<acc_t>& t, int64_t src) {
  return (t.i0 == src ? t.w0 : acc_t(0)) + (t.i1 == src ? t.w1 : acc_t(0));
}

template <typename scalar_t>
__global__ void gather_to_student_kernel(const scalar_t* __restrict__ grad_up, const Dims d,
                                         AxisTaps<at::opmath_type<scalar_t>> rows,
                                         AxisTaps<at::opmath_type<scalar_t>> cols,
                                         scalar_t* __restrict__ grad_s) {
  using acc_t = at::opmath_type<scalar_t>;
  AGKD_GRID_STRIDE(i, d.N * d.C * d.h * d.w) {  // i: contiguous index of grad_s
    const int64_t x = i % d.w, y = (i / d.w) % d.h, plane = i / (d.h * d.w);
    const scalar_t* g = grad_up + plane * d.H * d.W;
    acc_t sum = 0;
    for (int64_t q = rows.first[y]; q <= rows.last[y]; ++q) {
      const acc_t wr = tap_weight(rows.taps[q], y);
      for (int64_t j = cols.first[x]; j <= cols.last[x]; ++j) {
        sum += wr * tap_weight(cols.taps[j], x) * static_cast<acc_t>(g[q * d.W + j]);
      }
    }
    grad_s[i] = static_cast<scalar_t>(sum);
  }
}

// Per sample Σ (up - t)² over C·H·W (up contiguous, teacher strided): one block a sample.
template <typename scalar_t>
__global__ void squared_distance_kernel(const scalar_t* __restrict__ up,
                                        const scalar_t* __restrict__ teacher, const Dims d,
                                        at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kFlatThreads];
  const int64_t n = blockIdx.x, per = d.C * d.H * d.W;
  acc_t sum = 0;
  for (int64_t k = threadIdx.x; k < per; k += blockDim.x) {
    const int64_t j = k % d.W, q = (k / d.W) % d.H, c = k / (d.H * d.W);
    const acc_t diff = static_cast<acc_t>(up[n * per + k]) -
                       static_cast<acc_t>(teacher[n * d.t_strides[0] + c * d.t_strides[1] +
                                                  q * d.t_strides[2] + j * d.t_strides[3]]);
    sum += diff * diff;
  }
  sum = block_reduce(sum, scratch, SumOp{});
  if (threadIdx.x == 0) out[n] = sum;
}

// Adds the MSE gradient coeff[n]·(up - t) to grad_up and subtracts it from grad_t
// (both contiguous; either may be null).
template <typename scalar_t>
__global__ void mse_grad_kernel(const scalar_t* __restrict__ up, const scalar_t* __restrict__ teacher,
                                const Dims d, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                at::opmath_type<scalar_t> scale, scalar_t* __restrict__ grad_up,
                                scalar_t* __restrict__ grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per = d.C * d.H * d.W;
  AGKD_GRID_STRIDE(i, d.N * per) {
    const int64_t j = i % d.W, q = (i / d.W) % d.H, c = (i / (d.H * d.W)) % d.C, n = i / per;
    const acc_t t = static_cast<acc_t>(teacher[n * d.t_strides[0] + c * d.t_strides[1] +
                                               q * d.t_strides[2] + j * d.t_strides[3]]);
    const acc_t diff = align_mse_grad(scale * grad_loss[n], static_cast<acc_t>(up[i]), t);
    if (grad_up) grad_up[i] = static_cast<scalar_t>(static_cast<acc_t>(grad_up[i]) + diff);
    if (grad_t) grad_t[i] = static_cast<scalar_t>(static_cast<acc_t>(grad_t[i]) - diff);
  }
}

Dims dims_of(const at::Tensor& student, const at::Tensor& teacher) {
  Dims d{student.size(0), student.size(1), student.size(2), student.size(3), teacher.size(2),
         teacher.size(3), {}, {}};
  for (int k = 0; k < 4; ++k) d.s_strides[k] = student.stride(k), d.t_strides[k] = teacher.stride(k);
  return d;
}

// The student resampled to the teacher's size, plus the tables it was made with.
struct Resampled {
  at::Tensor up, row_table, col_table;
};

Resampled resample(const at::Tensor& student, const at::Tensor& teacher, const Dims& d,
                   bool align_corners) {
  Resampled r;
  r.up = at::empty(teacher.sizes(), teacher.options().memory_format(at::MemoryFormat::Contiguous));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "align_resample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    r.row_table = axis_table<acc_t>(d.h, d.H, align_corners, student);
    r.col_table = axis_table<acc_t>(d.w, d.W, align_corners, student);
    launch_kernel(resample_kernel<scalar_t>, flat_blocks(d.N * d.C * d.H * d.W), kFlatThreads, 0, stream,
                  student.const_data_ptr<scalar_t>(), d, axis_taps<acc_t>(r.row_table, d.h, d.H),
                  axis_taps<acc_t>(r.col_table, d.w, d.W), r.up.mutable_data_ptr<scalar_t>());
  });
  return r;
}

// Both maps min–max scaled (contiguous), with their ranges (N, C, 2).
struct ScaledMaps {
  at::Tensor student, student_range, teacher, teacher_range;
};

ScaledMaps minmax_scaled(const at::Tensor& student, const at::Tensor& teacher, double eps) {
  ScaledMaps m;
  std::tie(m.student, m.student_range) = minmax_scale_fwd_cuda(student, eps);
  std::tie(m.teacher, m.teacher_range) = minmax_scale_fwd_cuda(teacher, eps);
  return m;
}

std::tuple<at::Tensor, at::Tensor> align_fwd_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                  double alpha, double beta, double gamma,
                                                  int64_t window_size, double sigma, double c1,
                                                  double c2, c10::string_view padding, double eps,
                                                  bool align_corners, c10::string_view reduction,
                                                  std::optional<double> minmax_eps) {
  const AlignParams a = make_align_params(alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps,
                                          align_corners, minmax_eps);
  const Reduction reduce = parse_reduction(reduction);
  const PlaneGeometry g = align_geometry(student_in, teacher_in, a.hybrid);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const ScaledMaps scaled = minmax_eps ? minmax_scaled(student_in, teacher_in, *minmax_eps) : ScaledMaps{};
  const at::Tensor& student = minmax_eps ? scaled.student : student_in;
  const at::Tensor& teacher = minmax_eps ? scaled.teacher : teacher_in;
  const Dims d = dims_of(student, teacher);
  const Resampled r = resample(student, teacher, d, align_corners);
  const auto acc = accumulate_dtype(student.scalar_type());
  at::Tensor loss, stats;
  if (alpha != 0 || beta != 0) {
    std::tie(loss, stats) = hybrid_fwd_cuda(r.up, teacher, alpha, beta, window_size, sigma, c1,
                                            c2, padding, eps, "none");
  } else {
    loss = at::zeros({g.N}, student.options().dtype(acc));
    stats = at::zeros({g.N, kHybridStats}, student.options().dtype(acc));
  }
  if (gamma != 0) {
    at::Tensor sq = at::empty({g.N}, student.options().dtype(acc));
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "align_mse_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_kernel(squared_distance_kernel<scalar_t>, g.N, kFlatThreads, 0, stream,
                    r.up.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), d,
                    sq.mutable_data_ptr<acc_t>());
    });
    loss.add_(sq, align_mse_term(gamma, 1.0, static_cast<double>(g.C * g.H * g.W)));  // gamma / (C·H·W)
  }
  return {reduce_loss(loss, reduce), stats};
}

std::tuple<at::Tensor, at::Tensor> align_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student_in, const at::Tensor& teacher_in,
    const at::Tensor& stats, double alpha, double beta, double gamma, int64_t window_size,
    double sigma, double c1, double c2, c10::string_view padding, double eps, bool align_corners,
    bool needs_grad_student, bool needs_grad_teacher, std::optional<double> minmax_eps) {
  const AlignParams a = make_align_params(alpha, beta, gamma, window_size, sigma, c1, c2, padding, eps,
                                          align_corners, minmax_eps);
  const PlaneGeometry g = align_geometry(student_in, teacher_in, a.hybrid);
  HybridBackward b = prepare_hybrid_backward(grad_loss, stats, student_in, teacher_in, g, needs_grad_student,
                                             needs_grad_teacher);
  if (!b.needed) return {b.grad_a, b.grad_b};
  const c10::cuda::CUDAGuard guard(student_in.device());
  // Scaled again rather than saved: the maps are small, and the forward then keeps only its inputs.
  const ScaledMaps scaled = minmax_eps ? minmax_scaled(student_in, teacher_in, *minmax_eps) : ScaledMaps{};
  const at::Tensor& student = minmax_eps ? scaled.student : student_in;
  const at::Tensor& teacher = minmax_eps ? scaled.teacher : teacher_in;
  const Dims d = dims_of(student, teacher);
  const Resampled r = resample(student, teacher, d, align_corners);
  // The hybrid and MSE terms' gradients with respect to the resized map (teacher-sized),
  // then gathered onto the student's pixels; the teacher's gradient is b.grad_b itself.
  HybridBackward resized = b;
  resized.grad_a = input_grad_or_empty(r.up, needs_grad_student);
  if (alpha != 0 || beta != 0) {
    hybrid_bwd_cuda_into(resized, r.up, teacher, g, a.hybrid);
  } else {
    if (needs_grad_student) resized.grad_a.zero_();
    if (needs_grad_teacher) resized.grad_b.zero_();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "align_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (gamma != 0) {
      launch_kernel(mse_grad_kernel<scalar_t>, flat_blocks(d.N * d.C * d.H * d.W), kFlatThreads, 0,
                    stream, r.up.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), d,
                    b.grad_loss.const_data_ptr<acc_t>(),
                    static_cast<acc_t>(align_mse_grad_scale(gamma, static_cast<double>(g.C * g.H * g.W))),
                    needs_grad_student ? resized.grad_a.mutable_data_ptr<scalar_t>() : nullptr,
                    needs_grad_teacher ? resized.grad_b.mutable_data_ptr<scalar_t>() : nullptr);
    }
    if (needs_grad_student) {
      launch_kernel(gather_to_student_kernel<scalar_t>, flat_blocks(b.grad_a.numel()), kFlatThreads, 0,
                    stream, resized.grad_a.const_data_ptr<scalar_t>(), d,
                    axis_taps<acc_t>(r.row_table, d.h, d.H),
                    axis_taps<acc_t>(r.col_table, d.w, d.W), b.grad_a.mutable_data_ptr<scalar_t>());
    }
  });
  if (minmax_eps) {  // b holds the scaled maps' gradients
    if (needs_grad_student) b.grad_a = minmax_scale_bwd_cuda(b.grad_a, student_in, scaled.student_range, *minmax_eps);
    if (needs_grad_teacher) b.grad_b = minmax_scale_bwd_cuda(b.grad_b, teacher_in, scaled.teacher_range, *minmax_eps);
  }
  return {b.grad_a, b.grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CUDA, m) {
  register_kernel<op::AlignFwd>(m, &align_fwd_cuda);
  register_kernel<op::AlignBwd>(m, &align_bwd_cuda);
}

}  // namespace agkd
