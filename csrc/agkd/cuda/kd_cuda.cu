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
#include "agkd/cuda/rows.cuh"
#include "agkd/kd.h"
#include "agkd/math/kd.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

constexpr int kMaxThreads = kRowThreads;  // forward block size for long rows
constexpr int kGradThreads = 256;         // backward block size
constexpr int kGradPerThread = 4;         // classes per backward thread
constexpr int64_t kMaxGridY = 65535;

// Everything a KD kernel reads besides the saved stats, by value.
template <typename scalar_t>
struct KdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Logits<scalar_t> s, t, q;  // student, teacher, probability targets (kProb only)
  const int64_t* classes;    // class targets, or null
  RowMask mask;
  Smoothing<acc_t> smoothing;
  acc_t temperature, ce_weight, kl_weight;
  int64_t K;
  bool unread_probabilities;  // probability targets that the loss (ce_weight 0) never reads
};

template <typename scalar_t>
KdArgs<scalar_t> kd_args(const at::Tensor& student, const at::Tensor& teacher, const KdTarget& target,
                         const KdParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  return {logits_of<scalar_t>(student),
          logits_of<scalar_t>(teacher),
          logits_of<scalar_t>(target.probabilities ? target.tensor : student),
          target.classes(),
          target.mask(),
          make_smoothing<acc_t>(p.label_smoothing, student.size(1)),
          static_cast<acc_t>(p.temperature),
          static_cast<acc_t>(p.ce_weight),
          static_cast<acc_t>(p.kl_weight),
          student.size(1),
          target.probabilities && !p.with_ce()};
}

template <typename scalar_t, bool kCE, bool kKL, bool kProb>
__global__ void __launch_bounds__(kMaxThreads)
    kd_fwd_kernel(const KdArgs<scalar_t> a, at::opmath_type<scalar_t>* __restrict__ loss,
                  at::opmath_type<scalar_t>* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kMaxThreads];
  __shared__ double wide_scratch[kMaxThreads];
  const int64_t n = blockIdx.x, K = a.K;
  if (a.mask.ignored(n)) {  // the whole block leaves: nothing is read, loss 0, stats 0
    if (threadIdx.x == 0) loss[n] = 0, store_kd_stats(KdRowStats<acc_t>{}, stats + n * kKdStats);
    return;
  }
  const acc_t inv_tau = acc_t(1) / a.temperature;

  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    max_s = MaxOp{}(max_s, a.s.at(n, k));
    if (kKL) max_t = MaxOp{}(max_t, a.t.at(n, k));
  }
  max_s = block_reduce(max_s, scratch, MaxOp{});
  if (kKL) max_t = block_reduce(max_t, scratch, MaxOp{});
  // A target the loss does not read (ce_weight 0) is still checked, with no host sync: a
  // class outside [0, K) or a negative probability makes the row's loss NaN, as it does
  // when the cross-entropy reads the target. (The flag is the same for the whole block.)
  bool bad_target = !kCE && a.classes != nullptr && !kd_class_in_range(a.classes[n], K);
  if (!kCE && a.unread_probabilities) {
    acc_t bad = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      if (!(a.q.at(n, k) >= acc_t(0))) bad = 1;
    }
    bad_target = block_reduce(bad, scratch, MaxOp{}) > acc_t(0);
  }

  KdRowSums<acc_t> partial;  // this thread's classes, in acc_t
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const KdRowSums<acc_t> terms = kd_sum_terms<kCE, kKL, kProb>(
        a.s.at(n, k), kKL ? a.t.at(n, k) : acc_t(0), kProb ? a.q.at(n, k) : acc_t(0), max_s, max_t,
        inv_tau, DeviceExp{});
    partial.z_s += terms.z_s, partial.z_t += terms.z_t, partial.w += terms.w;
    partial.z_ce += terms.z_ce, partial.s_sum += terms.s_sum;
    partial.q_sum += terms.q_sum, partial.qs += terms.qs;
  }
  // The row totals in double, as on the CPU: KL = w/z_t − log z_t + log z_s cancels
  // terms of the size of log K, and τ² then scales what float32 would leave of it.
  // (Every condition below is the same for the whole block, as the barriers need.)
  const auto total = [&](acc_t part) { return block_reduce(static_cast<double>(part), wide_scratch, SumOp{}); };
  KdRowSums<double> sums;
  if (kKL) sums.z_s = total(partial.z_s), sums.z_t = total(partial.z_t), sums.w = total(partial.w);
  if (kCE) {
    sums.z_ce = total(partial.z_ce);
    if (a.smoothing.eps != acc_t(0)) sums.s_sum = total(partial.s_sum);
    if (kProb) sums.q_sum = total(partial.q_sum), sums.qs = total(partial.qs);
  }

  if (threadIdx.x == 0) {
    KdRowStats<acc_t> st = kd_row_stats<acc_t>(max_s, max_t, sums, kKL, kCE);
    acc_t ce = 0;
    if (kCE) {
      const CeTargetSums<acc_t> target =
          kProb ? probability_target_sums(static_cast<acc_t>(sums.q_sum), static_cast<acc_t>(sums.qs),
                                          a.smoothing)
                : class_target_sums(
                      kd_target_logit<acc_t>(a.classes[n], K, [&](int64_t k) { return a.s.at(n, k); }) - max_s);
      ce = kd_row_ce(st, target, static_cast<acc_t>(sums.s_sum), a.smoothing);
    }
    loss[n] = bad_target ? std::numeric_limits<acc_t>::quiet_NaN()
                         : kd_row_loss(st, ce, a.temperature, a.ce_weight, a.kl_weight);
    store_kd_stats(st, stats + n * kKdStats);
  }
}

template <typename scalar_t, bool kCE, bool kKL, bool kProb>
__global__ void __launch_bounds__(kGradThreads)
    kd_bwd_kernel(const KdArgs<scalar_t> a, const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                  const at::opmath_type<scalar_t>* __restrict__ stats, scalar_t* __restrict__ grad_s,
                  scalar_t* __restrict__ grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x, K = a.K;
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  const int64_t first = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (a.mask.ignored(n)) {  // an ignored row's gradient is exactly zero
    for (int64_t k = first; k < K; k += stride) {
      if (grad_s) grad_s[n * K + k] = scalar_t(0);
      if (grad_t) grad_t[n * K + k] = scalar_t(0);
    }
    return;
  }
  if (a.classes != nullptr && !kd_class_in_range(a.classes[n], K)) {  // its loss is NaN: so is its gradient
    for (int64_t k = first; k < K; k += stride) {
      if (grad_s) grad_s[n * K + k] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      if (grad_t) grad_t[n * K + k] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    }
    return;
  }
  const KdRowStats<acc_t> st = load_kd_stats(stats + n * kKdStats);
  const KdGradCoeffs<acc_t> c = kd_grad_coeffs(grad_loss[n], a.temperature, a.ce_weight, a.kl_weight);
  const acc_t inv_tau = acc_t(1) / a.temperature;
  const int64_t y = kCE && !kProb ? a.classes[n] : -1;
  for (int64_t k = first; k < K; k += stride) {
    const acc_t q = kProb ? target_probability(a.q.at(n, k)) : (k == y ? acc_t(1) : acc_t(0));
    const KdGradPair<acc_t> g = kd_grads_at<kCE, kKL>(st, c, a.s.at(n, k), kKL ? a.t.at(n, k) : acc_t(0),
                                                      q, a.smoothing, inv_tau, DeviceExp{});
    if (grad_s) grad_s[n * K + k] = static_cast<scalar_t>(g.student);
    if (grad_t) grad_t[n * K + k] = static_cast<scalar_t>(g.teacher);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_fwd_cuda(const at::Tensor& student,
                                               const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& target,
                                               double temperature, double ce_weight,
                                               double kl_weight, double label_smoothing,
                                               std::optional<int64_t> ignore_index,
                                               c10::string_view reduction) {
  const KdParams p{temperature, ce_weight, kl_weight, label_smoothing, ignore_index};
  const Reduction r = parse_reduction(reduction);
  const KdGeometry g = check_kd_inputs(student, teacher, target, p);
  TORCH_CHECK(g.N < (int64_t{1} << 31), "agkd::kd (CUDA): too many rows");
  const c10::cuda::CUDAGuard guard(student.device());
  auto [loss, stats] = per_sample_outputs(student, g.N, kKdStats);
  // Targets are not range-checked here: that would read them on the host and sync the
  // device. An out-of-range class or a negative probability makes its row's loss NaN,
  // whatever the weights.
  const KdTarget tgt = kd_target(target, p);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = row_threads(g.K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const KdArgs<scalar_t> a = kd_args<scalar_t>(student, teacher, tgt, p);
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      dispatch_flag(kCE && tgt.probabilities, [&]<bool kProb>() {
        launch_kernel(kd_fwd_kernel<scalar_t, kCE, kKL, kProb>, g.N, threads, 0, stream, a,
                      loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>());
      });
    });
  });
  return {reduce_kd_loss(loss, r, tgt), stats};
}

std::tuple<at::Tensor, at::Tensor> kd_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& target, const at::Tensor& stats, double temperature,
    double ce_weight, double kl_weight, double label_smoothing,
    std::optional<int64_t> ignore_index, bool needs_grad_student, bool needs_grad_teacher) {
  const KdParams p{temperature, ce_weight, kl_weight, label_smoothing, ignore_index};
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
    const KdArgs<scalar_t> a = kd_args<scalar_t>(student, teacher, b.target, p);
    scalar_t* gs = b.student ? b.grad_student.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = b.teacher ? b.grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      dispatch_flag(kCE && b.target.probabilities, [&]<bool kProb>() {
        launch_kernel(kd_bwd_kernel<scalar_t, kCE, kKL, kProb>, grid, kGradThreads, 0, stream, a,
                      b.grad_loss.const_data_ptr<acc_t>(), b.stats.const_data_ptr<acc_t>(), gs, gt);
      });
    });
  });
  return {b.grad_student, b.grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CUDA, m) {
  register_kernel<op::KdFwd>(m, &kd_fwd_cuda);
  register_kernel<op::KdBwd>(m, &kd_bwd_cuda);
}

}  // namespace agkd
