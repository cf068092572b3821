// CPU kernels of agkd::kd_fwd / agkd::kd_bwd (temperature-scaled KL and Hinton KD loss).
//
// Rows are independent, and at::parallel_for hands out whole rows, so every row's sums
// are taken in one fixed order whatever the thread count. The forward reads a row twice
// while it is in cache (maxima, then the sums of math/kd.h) and keeps seven numbers per row;
// the backward reads the logits once more and writes the gradients in one sweep, with the
// row's upstream gradient folded into two coefficients.
//
// Recompute rather than store: writing the gradient during the forward (and scaling it by
// the upstream gradient in the backward) trades one more read of both logit tensors for
// an (N, K) write plus a read-and-write pass, holds an (N, K) tensor alive between forward
// and backward, and costs the gradient even when only the loss is wanted; a prototype of
// the storing variant was slower on the CPU (benchmarks/results/design_choices.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "agkd/cpu/rows.h"
#include "agkd/cpu/vectorize.h"
#include "agkd/kd.h"
#include "agkd/math/kd.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

// Rows are grouped into tasks of at least this many logits, so small rows are not all
// scheduling overhead.
constexpr int64_t kLogitsPerTask = 16384;
// Logits summed in acc_t lanes before the partial sums move into double.
constexpr int64_t kChunk = 1024;

int64_t rows_per_task(int64_t K) { return std::max<int64_t>(1, kLogitsPerTask / K); }

// One row's sums (math/kd.h, KdRowSums): in acc_t lanes over chunks of kChunk classes,
// then in double. `q` is the probability target row (kProb) or null.
template <typename acc_t, bool kCE, bool kKL, bool kProb>
AGKD_CPU_INLINE KdRowSums<double> row_sums(const acc_t* __restrict s, const acc_t* __restrict t,
                                           const acc_t* __restrict q, int64_t K, acc_t max_s,
                                           acc_t max_t, acc_t inv_tau) {
  KdRowSums<double> total;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    acc_t z_s = 0, z_t = 0, w = 0, z_ce = 0, s_sum = 0, q_sum = 0, qs = 0;
    AGKD_SIMD_REDUCTION(+ : z_s, z_t, w, z_ce, s_sum, q_sum, qs)
    for (int64_t k = k0; k < k1; ++k) {
      const KdRowSums<acc_t> terms = kd_sum_terms<kCE, kKL, kProb>(
          s[k], kKL ? t[k] : acc_t(0), kProb ? q[k] : acc_t(0), max_s, max_t, inv_tau, SimdExp{});
      z_s += terms.z_s, z_t += terms.z_t, w += terms.w, z_ce += terms.z_ce;
      s_sum += terms.s_sum, q_sum += terms.q_sum, qs += terms.qs;
    }
    total.z_s += z_s, total.z_t += z_t, total.w += w, total.z_ce += z_ce;
    total.s_sum += s_sum, total.q_sum += q_sum, total.qs += qs;
  }
  return total;
}

// What a forward or backward pass reads besides the logits: the targets and the options
// of the cross-entropy.
template <typename scalar_t>
struct KdRowInputs {
  using acc_t = at::opmath_type<scalar_t>;
  LogitRows<scalar_t> student, teacher, probabilities;  // probabilities: kProb only
  const int64_t* classes;                               // class targets, or null
  RowMask mask;
  Smoothing<acc_t> smoothing;
  acc_t tau, inv_tau, ce_weight, kl_weight;
  KdRowInputs(const at::Tensor& s, const at::Tensor& t, const KdTarget& target, const KdParams& p)
      : student(s), teacher(t), probabilities(target.probabilities ? target.tensor : s),
        classes(target.classes()), mask(target.mask()),
        smoothing(make_smoothing<acc_t>(p.label_smoothing, s.size(1))),
        tau(static_cast<acc_t>(p.temperature)), inv_tau(acc_t(1) / tau),
        ce_weight(static_cast<acc_t>(p.ce_weight)), kl_weight(static_cast<acc_t>(p.kl_weight)) {}
};

template <typename scalar_t, bool kCE, bool kKL, bool kProb>
AGKD_CPU_MULTIVERSION void kd_fwd_rows(const KdRowInputs<scalar_t>& in, int64_t begin, int64_t end,
                                       at::opmath_type<scalar_t>* loss,
                                       at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = in.student.K;
  std::vector<acc_t> s_buffer, t_buffer, q_buffer;
  for (int64_t n = begin; n < end; ++n) {
    if (in.mask.ignored(n)) {  // nothing is read: loss 0, stats 0
      loss[n] = 0;
      store_kd_stats(KdRowStats<acc_t>{}, stats + n * kKdStats);
      continue;
    }
    const acc_t* s = in.student.row(n, s_buffer);
    const acc_t* t = kKL ? in.teacher.row(n, t_buffer) : nullptr;
    const acc_t* q = kProb ? in.probabilities.row(n, q_buffer) : nullptr;
    const acc_t max_s = row_max(s, K);
    const acc_t max_t = kKL ? row_max(t, K) : acc_t(0);
    const KdRowSums<double> sums = row_sums<acc_t, kCE, kKL, kProb>(s, t, q, K, max_s, max_t, in.inv_tau);
    KdRowStats<acc_t> st = kd_row_stats<acc_t>(max_s, max_t, sums, kKL, kCE);
    acc_t ce = 0;
    if constexpr (kCE) {
      const CeTargetSums<acc_t> target =
          kProb ? probability_target_sums(static_cast<acc_t>(sums.q_sum), static_cast<acc_t>(sums.qs),
                                          in.smoothing)
                : class_target_sums(kd_target_logit<acc_t>(in.classes[n], K, [&](int64_t k) { return s[k]; }) -
                                    max_s);
      ce = kd_row_ce(st, target, static_cast<acc_t>(sums.s_sum), in.smoothing);
    }
    loss[n] = kd_row_loss(st, ce, in.tau, in.ce_weight, in.kl_weight);
    store_kd_stats(st, stats + n * kKdStats);
  }
}

// Targets checked on the host before any logit is read: on the CPU this costs one pass
// over the targets and gives the user a ValueError, where the CUDA kernels, which must
// not sync the device, turn such a row's loss into NaN (math/kd.h).
void check_class_targets(const KdTarget& target, int64_t N, int64_t K) {
  const int64_t* classes = target.classes();
  const RowMask mask = target.mask();
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t n = 0; n < N; ++n) {  // over the rows that count (there may be none)
    if (mask.ignored(n)) continue;
    lo = std::min(lo, classes[n]), hi = std::max(hi, classes[n]);
  }
  TORCH_CHECK_VALUE(lo > hi || (lo >= 0 && hi < K), "agkd_ops.kd_loss: target must hold class indices in [0, ",
                    K, ") for K=", K, " classes, got values from ", lo, " to ", hi,
                    target.ignores ? " (besides ignore_index=" + std::to_string(target.ignore_index) + ")"
                                   : std::string(" (there is no ignore_index)"));
}

template <typename scalar_t>
void check_probability_targets(const at::Tensor& target) {
  const LogitRows<scalar_t> rows(target);
  std::vector<at::opmath_type<scalar_t>> buffer;
  for (int64_t n = 0; n < target.size(0); ++n) {
    const auto* q = rows.row(n, buffer);
    for (int64_t k = 0; k < rows.K; ++k) {
      TORCH_CHECK_VALUE(!(q[k] < 0), "agkd_ops.kd_loss: probability targets must be >= 0, got ",
                        static_cast<double>(q[k]), " at row ", n, ", class ", k);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kd_fwd_cpu(const at::Tensor& student,
                                              const at::Tensor& teacher,
                                              const std::optional<at::Tensor>& target,
                                              double temperature, double ce_weight,
                                              double kl_weight, double label_smoothing,
                                              std::optional<int64_t> ignore_index,
                                              c10::string_view reduction) {
  const KdParams p{temperature, ce_weight, kl_weight, label_smoothing, ignore_index};
  const Reduction r = parse_reduction(reduction);
  const KdGeometry g = check_kd_inputs(student, teacher, target, p);
  const KdTarget tgt = kd_target(target, p);
  auto [loss, stats] = per_sample_outputs(student, g.N, kKdStats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (tgt.probabilities) check_probability_targets<scalar_t>(tgt.tensor);
    else if (tgt.tensor.defined()) check_class_targets(tgt, g.N, g.K);
    const KdRowInputs<scalar_t> in(student, teacher, tgt, p);
    acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
    acc_t* stats_out = stats.mutable_data_ptr<acc_t>();
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      dispatch_flag(kCE && tgt.probabilities, [&]<bool kProb>() {
        at::parallel_for(0, g.N, rows_per_task(g.K), [&](int64_t begin, int64_t end) {
          kd_fwd_rows<scalar_t, kCE, kKL, kProb>(in, begin, end, loss_out, stats_out);
        });
      });
    });
  });
  return {reduce_kd_loss(loss, r, tgt), stats};
}

// --------------------------------------------------------------------------- backward

// One row of both gradients. kGradS / kGradT select the outputs, so the lane loop has no
// per-element branch on them.
template <typename scalar_t, bool kCE, bool kKL, bool kProb, bool kGradS, bool kGradT>
AGKD_CPU_INLINE void kd_grad_row(const at::opmath_type<scalar_t>* __restrict s,
                                 const at::opmath_type<scalar_t>* __restrict t,
                                 const at::opmath_type<scalar_t>* __restrict q, int64_t K,
                                 int64_t target, const KdRowStats<at::opmath_type<scalar_t>>& st,
                                 const KdGradCoeffs<at::opmath_type<scalar_t>>& c,
                                 const Smoothing<at::opmath_type<scalar_t>>& smoothing,
                                 at::opmath_type<scalar_t> inv_tau,
                                 scalar_t* __restrict grad_s, scalar_t* __restrict grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  AGKD_SIMD
  for (int64_t k = 0; k < K; ++k) {
    const acc_t q_k = kProb ? target_probability(q[k]) : (k == target ? acc_t(1) : acc_t(0));
    const KdGradPair<acc_t> grad = kd_grads_at<kCE, kKL>(st, c, s[k], kKL ? t[k] : acc_t(0), q_k,
                                                         smoothing, inv_tau, SimdExp{});
    if constexpr (kGradS) grad_s[k] = static_cast<scalar_t>(grad.student);
    if constexpr (kGradT) grad_t[k] = static_cast<scalar_t>(grad.teacher);
  }
}

template <typename scalar_t, bool kCE, bool kKL, bool kProb, bool kGradS, bool kGradT>
AGKD_CPU_MULTIVERSION void kd_bwd_rows(const KdRowInputs<scalar_t>& in,
                                       const at::opmath_type<scalar_t>* grad_loss,
                                       const at::opmath_type<scalar_t>* stats, int64_t begin,
                                       int64_t end, scalar_t* grad_s, scalar_t* grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = in.student.K;
  std::vector<acc_t> s_buffer, t_buffer, q_buffer;
  for (int64_t n = begin; n < end; ++n) {
    if (in.mask.ignored(n)) {  // an ignored row's gradient is exactly zero
      if constexpr (kGradS) std::fill_n(grad_s + n * K, K, scalar_t(0));
      if constexpr (kGradT) std::fill_n(grad_t + n * K, K, scalar_t(0));
      continue;
    }
    const KdRowStats<acc_t> st = load_kd_stats(stats + n * kKdStats);
    const KdGradCoeffs<acc_t> c = kd_grad_coeffs(grad_loss[n], in.tau, in.ce_weight, in.kl_weight);
    const acc_t* s = in.student.row(n, s_buffer);
    const acc_t* t = kKL ? in.teacher.row(n, t_buffer) : nullptr;
    const acc_t* q = kProb ? in.probabilities.row(n, q_buffer) : nullptr;
    // An out-of-range class (direct op calls only) matches no class; the forward's loss
    // for that row is already NaN.
    kd_grad_row<scalar_t, kCE, kKL, kProb, kGradS, kGradT>(
        s, t, q, K, kCE && !kProb ? in.classes[n] : -1, st, c, in.smoothing, in.inv_tau,
        kGradS ? grad_s + n * K : nullptr, kGradT ? grad_t + n * K : nullptr);
  }
}

std::tuple<at::Tensor, at::Tensor> kd_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
    const std::optional<at::Tensor>& target, const at::Tensor& stats, double temperature,
    double ce_weight, double kl_weight, double label_smoothing,
    std::optional<int64_t> ignore_index, bool needs_grad_student, bool needs_grad_teacher) {
  const KdParams p{temperature, ce_weight, kl_weight, label_smoothing, ignore_index};
  KdBackward b = prepare_kd_backward(grad_loss, student, teacher, target, stats, p,
                                     needs_grad_student, needs_grad_teacher);
  if (!b.student && !b.teacher) return {b.grad_student, b.grad_teacher};
  const int64_t N = student.size(0), K = student.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const KdRowInputs<scalar_t> in(student, teacher, b.target, p);
    const acc_t* gl = b.grad_loss.const_data_ptr<acc_t>();
    const acc_t* st = b.stats.const_data_ptr<acc_t>();
    scalar_t* gs = b.student ? b.grad_student.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = b.teacher ? b.grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      dispatch_flag(kCE && b.target.probabilities, [&]<bool kProb>() {
        at::parallel_for(0, N, rows_per_task(K), [&](int64_t begin, int64_t end) {
          // The outputs are template flags too, so the lane loop never branches on them.
          dispatch_terms(gs != nullptr, gt != nullptr, [&]<bool kGradS, bool kGradT>() {
            kd_bwd_rows<scalar_t, kCE, kKL, kProb, kGradS, kGradT>(in, gl, st, begin, end, gs, gt);
          });
        });
      });
    });
  });
  return {b.grad_student, b.grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CPU, m) {
  register_kernel<op::KdFwd>(m, &kd_fwd_cpu);
  register_kernel<op::KdBwd>(m, &kd_bwd_cpu);
}

}  // namespace agkd
