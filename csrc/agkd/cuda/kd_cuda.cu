// CUDA kernel of agkd::kd_fwd (temperature-scaled KL and Hinton KD loss, and its gradients).
//
// One block per row. Its threads stride over the row (any K: a row longer than the block
// is simply several strides), reduce the maxima, then the sums of math/kd.h, with
// fixed-order block trees (cuda/block_reduce.cuh); thread 0 writes the row's loss and
// statistics. When gradients are asked for, thread 0 also shares the row's statistics
// through shared memory and every thread writes its classes' gradients in a third stride
// over the row, which the block has just read (so it comes from cache): the logits are
// read from memory once and the gradient written once. The exponentials are taken again
// there (kd_grads_at) rather than kept, as a GPU row has no room for them near the
// threads and exp is cheap beside the memory traffic. The autograd's backward only
// scales the saved gradients (autograd/kd_autograd.cpp).
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

constexpr int kMaxThreads = kRowThreads;  // block size for long rows

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

// Where the kernel writes: loss and stats per row and, when asked for, the gradients,
// each row's times `factor` or, for a "mean" with ignore_index, 1 / *counted_rows.
template <typename acc_t>
struct KdOutputs {
  acc_t* loss;
  acc_t* stats;
  acc_t* grad_s;
  acc_t* grad_t;
  acc_t factor;
  const acc_t* counted_rows;
};

template <typename scalar_t, bool kCE, bool kKL, bool kProb, bool kGradS, bool kGradT>
__global__ void __launch_bounds__(kMaxThreads)
    kd_fwd_kernel(const KdArgs<scalar_t> a, const KdOutputs<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kGrad = kGradS || kGradT;
  __shared__ acc_t scratch[kMaxThreads];
  __shared__ double wide_scratch[kMaxThreads];
  __shared__ acc_t row_stats[kKdStats + 1];  // the row's stats and its NaN flag, for the gradient stride
  const int64_t n = blockIdx.x, K = a.K;
  acc_t* const loss = out.loss;
  acc_t* const stats = out.stats;
  if (a.mask.ignored(n)) {  // the whole block leaves: nothing is read, loss 0, stats 0, gradient 0
    if (threadIdx.x == 0) loss[n] = 0, store_kd_stats(KdRowStats<acc_t>{}, stats + n * kKdStats);
    for (int64_t k = threadIdx.x; kGrad && k < K; k += blockDim.x) {
      if (kGradS) out.grad_s[n * K + k] = acc_t(0);
      if (kGradT) out.grad_t[n * K + k] = acc_t(0);
    }
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
    if (kGrad) {
      store_kd_stats(st, row_stats);
      // A bad target (or, below, an out-of-range class) makes the row's gradient NaN too.
      row_stats[kKdStats] = bad_target || (kCE && !kProb && !kd_class_in_range(a.classes[n], K)) ? acc_t(1) : acc_t(0);
    }
  }
  if constexpr (kGrad) {
    __syncthreads();
    const KdRowStats<acc_t> st = load_kd_stats(row_stats);
    const bool nan_row = row_stats[kKdStats] != acc_t(0);
    const acc_t factor = out.counted_rows != nullptr ? acc_t(1) / *out.counted_rows : out.factor;
    const KdGradCoeffs<acc_t> c = kd_grad_coeffs(factor, a.temperature, a.ce_weight, a.kl_weight);
    const int64_t y = kCE && !kProb ? a.classes[n] : -1;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const acc_t q = kProb ? target_probability(a.q.at(n, k)) : (k == y ? acc_t(1) : acc_t(0));
      KdGradPair<acc_t> g = kd_grads_at<kCE, kKL>(st, c, a.s.at(n, k), kKL ? a.t.at(n, k) : acc_t(0), q,
                                                  a.smoothing, inv_tau, DeviceExp{});
      if (nan_row) g.student = g.teacher = std::numeric_limits<acc_t>::quiet_NaN();
      if (kGradS) out.grad_s[n * K + k] = g.student;
      if (kGradT) out.grad_t[n * K + k] = g.teacher;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    double temperature, double ce_weight, double kl_weight, double label_smoothing,
    std::optional<int64_t> ignore_index, c10::string_view reduction, bool needs_grad_student,
    bool needs_grad_teacher) {
  const KdParams p{temperature, ce_weight, kl_weight, label_smoothing, ignore_index};
  const Reduction r = parse_reduction(reduction);
  const KdGeometry g = check_kd_inputs(student, teacher, target, p);
  TORCH_CHECK(g.N < (int64_t{1} << 31), "agkd::kd (CUDA): too many rows");
  const c10::cuda::CUDAGuard guard(student.device());
  auto [loss, stats] = per_sample_outputs(student, g.N, kKdStats);
  // Targets are not range-checked here: that would read them on the host and sync the
  // device. An out-of-range class or a negative probability makes its row's loss (and
  // gradient) NaN, whatever the weights.
  const KdTarget tgt = kd_target(target, p);
  KdForwardGrads grads = kd_forward_grads(student, p, r, tgt, needs_grad_student, needs_grad_teacher);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = row_threads(g.K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const KdArgs<scalar_t> a = kd_args<scalar_t>(student, teacher, tgt, p);
    const KdOutputs<acc_t> out{loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(),
                               grads.write_student ? grads.student.mutable_data_ptr<acc_t>() : nullptr,
                               grads.write_teacher ? grads.teacher.mutable_data_ptr<acc_t>() : nullptr,
                               static_cast<acc_t>(grads.row_factor),
                               grads.counted_rows.defined() ? grads.counted_rows.const_data_ptr<acc_t>() : nullptr};
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      dispatch_flag(kCE && tgt.probabilities, [&]<bool kProb>() {
        dispatch_terms<true>(out.grad_s != nullptr, out.grad_t != nullptr, [&]<bool kGradS, bool kGradT>() {
          launch_kernel(kd_fwd_kernel<scalar_t, kCE, kKL, kProb, kGradS, kGradT>, g.N, threads, 0, stream, a, out);
        });
      });
    });
  });
  return {reduce_kd_loss(loss, r, grads), stats, grads.student, grads.teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CUDA, m) { register_kernel<op::KdFwd>(m, &kd_fwd_cuda); }

}  // namespace agkd
