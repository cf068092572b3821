// CUDA kernels of agkd::kd_fwd / agkd::kd_bwd (temperature-scaled KL and Hinton KD loss).
//
// Forward: one block per row. Its threads stride over the row (any K: a row longer than
// the block is simply several strides), reduce the maxima, then the sums of math/kd.h,
// with fixed-order block trees (cuda/block_reduce.cuh); thread 0 writes the row's loss and
// statistics. Backward: a 2-D grid of (row, chunk of classes); every thread recomputes its
// classes' gradients from the logits and the row's saved statistics (the same choice, and
// the same math, as the CPU kernel: see cpu/kd_cpu.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>

#include "agkd/cuda/block_reduce.cuh"
#include "agkd/cuda/launch.cuh"
#include "agkd/kd.h"
#include "agkd/math/kd.h"

namespace agkd {
namespace {

constexpr int kMaxThreads = 512;        // forward block size for long rows
constexpr int kGradThreads = 256;       // backward block size
constexpr int kGradPerThread = 4;       // classes per backward thread
constexpr int64_t kMaxGridY = 65535;

struct DeviceExp {
  __device__ __forceinline__ float operator()(float x) const { return expf(x); }
  __device__ __forceinline__ double operator()(double x) const { return exp(x); }
};

// (N, K) logits of any strides, read as acc_t.
template <typename scalar_t>
struct Logits {
  const scalar_t* data;
  int64_t sN, sK;
  __device__ __forceinline__ at::opmath_type<scalar_t> at(int64_t n, int64_t k) const {
    return static_cast<at::opmath_type<scalar_t>>(data[n * sN + k * sK]);
  }
};

template <typename scalar_t>
Logits<scalar_t> logits_of(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

// A power of two between 32 and kMaxThreads, about one thread per four logits.
int forward_threads(int64_t K) {
  int threads = 32;
  while (threads < kMaxThreads && threads * 4 < K) threads *= 2;
  return threads;
}

template <typename scalar_t, bool kCE, bool kKL>
__global__ void __launch_bounds__(kMaxThreads)
    kd_fwd_kernel(const Logits<scalar_t> s, const Logits<scalar_t> t,
                  const int64_t* __restrict__ target, int64_t K,
                  at::opmath_type<scalar_t> temperature, at::opmath_type<scalar_t> ce_weight,
                  at::opmath_type<scalar_t> kl_weight, at::opmath_type<scalar_t>* __restrict__ loss,
                  at::opmath_type<scalar_t>* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kMaxThreads];
  __shared__ double wide_scratch[kMaxThreads];
  const int64_t n = blockIdx.x;
  const acc_t inv_tau = acc_t(1) / temperature;

  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    max_s = MaxOp{}(max_s, s.at(n, k));
    if (kKL) max_t = MaxOp{}(max_t, t.at(n, k));
  }
  max_s = block_reduce(max_s, scratch, MaxOp{});
  if (kKL) max_t = block_reduce(max_t, scratch, MaxOp{});

  KdRowSums<acc_t> partial;  // this thread's classes, in acc_t
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const KdRowSums<acc_t> terms = kd_sum_terms<kCE, kKL>(
        s.at(n, k), kKL ? t.at(n, k) : acc_t(0), max_s, max_t, inv_tau, DeviceExp{});
    partial.z_s += terms.z_s, partial.z_t += terms.z_t, partial.w += terms.w;
    partial.z_ce += terms.z_ce;
  }
  // The row totals in double, as on the CPU: KL = w/z_t − log z_t + log z_s cancels
  // terms of the size of log K, and τ² then scales what float32 would leave of it.
  KdRowSums<double> sums;
  if (kKL) {
    sums.z_s = block_reduce(static_cast<double>(partial.z_s), wide_scratch, SumOp{});
    sums.z_t = block_reduce(static_cast<double>(partial.z_t), wide_scratch, SumOp{});
    sums.w = block_reduce(static_cast<double>(partial.w), wide_scratch, SumOp{});
  }
  if (kCE) sums.z_ce = block_reduce(static_cast<double>(partial.z_ce), wide_scratch, SumOp{});

  if (threadIdx.x == 0) {
    const KdRowStats<acc_t> st = kd_row_stats<acc_t>(max_s, max_t, sums, kKL, kCE);
    const acc_t s_target =
        kCE ? kd_target_logit<acc_t>(target[n], K, [&](int64_t k) { return s.at(n, k); })
            : acc_t(0);
    loss[n] = kd_row_loss(st, s_target, temperature, ce_weight, kl_weight);
    store_kd_stats(st, stats + n * kKdStats);
  }
}

template <typename scalar_t, bool kCE, bool kKL>
__global__ void __launch_bounds__(kGradThreads)
    kd_bwd_kernel(const Logits<scalar_t> s, const Logits<scalar_t> t,
                  const int64_t* __restrict__ target, int64_t K,
                  const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                  const at::opmath_type<scalar_t>* __restrict__ stats,
                  at::opmath_type<scalar_t> temperature, at::opmath_type<scalar_t> ce_weight,
                  at::opmath_type<scalar_t> kl_weight, scalar_t* __restrict__ grad_s,
                  scalar_t* __restrict__ grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const KdRowStats<acc_t> st = load_kd_stats(stats + n * kKdStats);
  const KdGradCoeffs<acc_t> c = kd_grad_coeffs(grad_loss[n], temperature, ce_weight, kl_weight);
  const acc_t inv_tau = acc_t(1) / temperature;
  const int64_t y = kCE ? target[n] : -1;  // out of range: matches no class (loss is NaN)
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t k = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; k < K; k += stride) {
    const KdGradPair<acc_t> g = kd_grads_at<kCE, kKL>(
        st, c, s.at(n, k), kKL ? t.at(n, k) : acc_t(0), k == y, inv_tau, DeviceExp{});
    if (grad_s) grad_s[n * K + k] = static_cast<scalar_t>(g.student);
    if (grad_t) grad_t[n * K + k] = static_cast<scalar_t>(g.teacher);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_fwd_cuda(const at::Tensor& student,
                                               const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& target,
                                               double temperature, double ce_weight,
                                               double kl_weight, c10::string_view reduction) {
  const KdParams p{temperature, ce_weight, kl_weight};
  const Reduction r = parse_reduction(reduction);
  const KdGeometry g = check_kd_inputs(student, teacher, target, p);
  TORCH_CHECK(g.N < (int64_t{1} << 31), "agkd::kd (CUDA): too many rows");
  const c10::cuda::CUDAGuard guard(student.device());
  auto [loss, stats] = per_sample_outputs(student, g.N, kKdStats);
  const at::Tensor target_c = p.with_ce() ? target->contiguous() : at::Tensor();
  const int64_t* tgt = p.with_ce() ? target_c.const_data_ptr<int64_t>() : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = forward_threads(g.K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Logits<scalar_t> s = logits_of<scalar_t>(student), t = logits_of<scalar_t>(teacher);
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      launch_kernel(kd_fwd_kernel<scalar_t, kCE, kKL>, g.N, threads, 0, stream, s, t, tgt, g.K,
                    static_cast<acc_t>(temperature), static_cast<acc_t>(ce_weight),
                    static_cast<acc_t>(kl_weight), loss.mutable_data_ptr<acc_t>(),
                    stats.mutable_data_ptr<acc_t>());
    });
  });
  return {reduce_loss(loss, r), stats};
}

std::tuple<at::Tensor, at::Tensor> kd_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& target, const at::Tensor& stats, double temperature,
    double ce_weight, double kl_weight, bool needs_grad_student, bool needs_grad_teacher) {
  const KdParams p{temperature, ce_weight, kl_weight};
  const c10::cuda::CUDAGuard guard(student.device());
  KdBackward b = prepare_kd_backward(grad_loss, student, teacher, target, stats, p,
                                     needs_grad_student, needs_grad_teacher);
  if (!b.student && !b.teacher) return {b.grad_student, b.grad_teacher};
  const int64_t N = student.size(0), K = student.size(1);
  TORCH_CHECK(N < (int64_t{1} << 31), "agkd::kd (CUDA): too many rows");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t per_block = int64_t{kGradThreads} * kGradPerThread;
  const dim3 grid(static_cast<unsigned>(N),
                  static_cast<unsigned>(std::min(kMaxGridY, (K + per_block - 1) / per_block)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Logits<scalar_t> s = logits_of<scalar_t>(student), t = logits_of<scalar_t>(teacher);
    scalar_t* gs = b.student ? b.grad_student.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = b.teacher ? b.grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      launch_kernel(kd_bwd_kernel<scalar_t, kCE, kKL>, grid, kGradThreads, 0, stream, s, t,
                    b.target_data(), K, b.grad_loss.const_data_ptr<acc_t>(),
                    b.stats.const_data_ptr<acc_t>(), static_cast<acc_t>(temperature),
                    static_cast<acc_t>(ce_weight), static_cast<acc_t>(kl_weight), gs, gt);
    });
  });
  return {b.grad_student, b.grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CUDA, m) {
  m.impl("kd_fwd", &kd_fwd_cuda);
  m.impl("kd_bwd", &kd_bwd_cuda);
}

}  // namespace agkd
