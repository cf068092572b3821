// CPU kernel of agkd::kd_fwd (temperature-scaled KL and Hinton KD loss, and its gradients).
//
// Rows are independent, and at::parallel_for hands out whole rows, so every row's sums
// are taken in one fixed order whatever the thread count. A row is read while it is in
// cache: its maxima, then the sums of math/kd.h, and, when gradients are asked for, one
// more sweep that writes them from the exponentials the sums took (kept in a row buffer),
// so that every exponential is computed once. The autograd's backward then only scales
// the saved gradients by the upstream one (autograd/kd_autograd.cpp).
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
// then in double. `q` is the probability target row (kProb) or null. With kKeep, every
// class's exponentials also go to `kept` (for the gradient sweep).
template <typename acc_t>
struct KeptExps {  // one array per exponential, so that the lane loops store and load densely
  std::vector<acc_t> b, a, ce;
  explicit KeptExps(int64_t K) : b(K), a(K), ce(K) {}
};

template <typename acc_t, bool kCE, bool kKL, bool kProb, bool kKeep>
AGKD_CPU_INLINE KdRowSums<double> row_sums(const acc_t* __restrict s, const acc_t* __restrict t,
                                           const acc_t* __restrict q, int64_t K, acc_t max_s,
                                           acc_t max_t, acc_t inv_tau, acc_t* __restrict kept_b,
                                           acc_t* __restrict kept_a, acc_t* __restrict kept_ce) {
  KdRowSums<double> total;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk);
    acc_t z_s = 0, z_t = 0, w = 0, z_ce = 0, s_sum = 0, q_sum = 0, qs = 0;
    AGKD_SIMD_REDUCTION(+ : z_s, z_t, w, z_ce, s_sum, q_sum, qs)
    for (int64_t k = k0; k < k1; ++k) {
      const KdClass<acc_t> c = kd_class<kCE, kKL>(s[k], kKL ? t[k] : acc_t(0), max_s, max_t, inv_tau, SimdExp{});
      if constexpr (kKeep) {
        if constexpr (kKL) kept_b[k] = c.exps.b, kept_a[k] = c.exps.a;
        if constexpr (kCE) kept_ce[k] = c.exps.ce;
      }
      const KdRowSums<acc_t> terms = kd_sum_terms_of<kCE, kKL, kProb>(c, kProb ? q[k] : acc_t(0));
      z_s += terms.z_s, z_t += terms.z_t, w += terms.w, z_ce += terms.z_ce;
      s_sum += terms.s_sum, q_sum += terms.q_sum, qs += terms.qs;
    }
    total.z_s += z_s, total.z_t += z_t, total.w += w, total.z_ce += z_ce;
    total.s_sum += s_sum, total.q_sum += q_sum, total.qs += qs;
  }
  return total;
}

// One row of both gradients from its kept exponentials. kGradS / kGradT select the
// outputs, so the lane loop has no per-element branch on them.
template <typename acc_t, bool kCE, bool kKL, bool kProb, bool kGradS, bool kGradT>
AGKD_CPU_INLINE void grad_row(const acc_t* __restrict s, const acc_t* __restrict t, const acc_t* __restrict q,
                              const acc_t* __restrict kept_b, const acc_t* __restrict kept_a,
                              const acc_t* __restrict kept_ce, int64_t K, int64_t target,
                              const KdRowStats<acc_t>& st, const KdGradCoeffs<acc_t>& c,
                              const Smoothing<acc_t>& smoothing, acc_t inv_tau, acc_t* __restrict grad_s,
                              acc_t* __restrict grad_t) {
  const KdInverseSums<acc_t> inv = kd_inverse_sums(st);
  AGKD_SIMD
  for (int64_t k = 0; k < K; ++k) {
    const acc_t q_k = kProb ? target_probability(q[k]) : (k == target ? acc_t(1) : acc_t(0));
    const KdExps<acc_t> e{kKL ? kept_b[k] : acc_t(0), kKL ? kept_a[k] : acc_t(0), kCE ? kept_ce[k] : acc_t(0)};
    const KdGradPair<acc_t> g =
        kd_grads_from_exps<kCE, kKL>(st, inv, c, e, s[k], kKL ? t[k] : acc_t(0), q_k, smoothing, inv_tau);
    if constexpr (kGradS) grad_s[k] = g.student;
    if constexpr (kGradT) grad_t[k] = g.teacher;
  }
}

// What the forward reads besides the logits: the targets and the options of the
// cross-entropy.
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

// Where the forward writes: the per-row loss and stats, and the gradients when asked for
// (null otherwise), each row's scaled by row_factor (kd.h, KdForwardGrads).
template <typename acc_t>
struct KdRowOutputs {
  acc_t* loss;
  acc_t* stats;
  acc_t* grad_s;
  acc_t* grad_t;
  acc_t row_factor;
};

template <typename scalar_t, bool kCE, bool kKL, bool kProb, bool kGradS, bool kGradT>
AGKD_CPU_MULTIVERSION void kd_fwd_rows(const KdRowInputs<scalar_t>& in, int64_t begin, int64_t end,
                                       const KdRowOutputs<at::opmath_type<scalar_t>>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kGrad = kGradS || kGradT;
  const int64_t K = in.student.K;
  std::vector<acc_t> s_buffer, t_buffer, q_buffer;
  KeptExps<acc_t> kept(kGrad ? K : 0);
  for (int64_t n = begin; n < end; ++n) {
    if (in.mask.ignored(n)) {  // nothing is read: loss 0, stats 0, gradient exactly 0
      out.loss[n] = 0;
      store_kd_stats(KdRowStats<acc_t>{}, out.stats + n * kKdStats);
      if constexpr (kGradS) std::fill_n(out.grad_s + n * K, K, acc_t(0));
      if constexpr (kGradT) std::fill_n(out.grad_t + n * K, K, acc_t(0));
      continue;
    }
    const acc_t* s = in.student.row(n, s_buffer);
    const acc_t* t = kKL ? in.teacher.row(n, t_buffer) : nullptr;
    const acc_t* q = kProb ? in.probabilities.row(n, q_buffer) : nullptr;
    const acc_t max_s = row_max(s, K);
    const acc_t max_t = kKL ? row_max(t, K) : acc_t(0);
    const KdRowSums<double> sums =
        row_sums<acc_t, kCE, kKL, kProb, kGrad>(s, t, q, K, max_s, max_t, in.inv_tau, kept.b.data(),
                                                kept.a.data(), kept.ce.data());
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
    out.loss[n] = kd_row_loss(st, ce, in.tau, in.ce_weight, in.kl_weight);
    store_kd_stats(st, out.stats + n * kKdStats);
    if constexpr (kGrad) {
      const KdGradCoeffs<acc_t> c = kd_grad_coeffs(out.row_factor, in.tau, in.ce_weight, in.kl_weight);
      grad_row<acc_t, kCE, kKL, kProb, kGradS, kGradT>(
          s, t, q, kept.b.data(), kept.a.data(), kept.ce.data(), K, kCE && !kProb ? in.classes[n] : -1, st, c, in.smoothing, in.inv_tau,
          kGradS ? out.grad_s + n * K : nullptr, kGradT ? out.grad_t + n * K : nullptr);
    }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& target,
    double temperature, double ce_weight, double kl_weight, double label_smoothing,
    std::optional<int64_t> ignore_index, c10::string_view reduction, bool needs_grad_student,
    bool needs_grad_teacher) {
  const KdParams p{temperature, ce_weight, kl_weight, label_smoothing, ignore_index};
  const Reduction r = parse_reduction(reduction);
  const KdGeometry g = check_kd_inputs(student, teacher, target, p);
  const KdTarget tgt = kd_target(target, p);
  auto [loss, stats] = per_sample_outputs(student, g.N, kKdStats);
  KdForwardGrads grads = kd_forward_grads(student, p, r, tgt, needs_grad_student, needs_grad_teacher);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (tgt.probabilities) check_probability_targets<scalar_t>(tgt.tensor);
    else if (tgt.tensor.defined()) check_class_targets(tgt, g.N, g.K);
    const KdRowInputs<scalar_t> in(student, teacher, tgt, p);
    // On the CPU the "mean" count is a host number: read it once.
    const double factor = grads.counted_rows.defined() ? 1.0 / grads.counted_rows.item<double>() : grads.row_factor;
    const KdRowOutputs<acc_t> out{loss.mutable_data_ptr<acc_t>(), stats.mutable_data_ptr<acc_t>(),
                                  grads.write_student ? grads.student.mutable_data_ptr<acc_t>() : nullptr,
                                  grads.write_teacher ? grads.teacher.mutable_data_ptr<acc_t>() : nullptr,
                                  static_cast<acc_t>(factor)};
    dispatch_terms(p.with_ce(), p.with_kl(), [&]<bool kCE, bool kKL>() {
      dispatch_flag(kCE && tgt.probabilities, [&]<bool kProb>() {
        // The outputs are template flags too, so the lane loops never branch on them.
        dispatch_terms<true>(out.grad_s != nullptr, out.grad_t != nullptr, [&]<bool kGradS, bool kGradT>() {
          at::parallel_for(0, g.N, rows_per_task(g.K), [&](int64_t begin, int64_t end) {
            kd_fwd_rows<scalar_t, kCE, kKL, kProb, kGradS, kGradT>(in, begin, end, out);
          });
        });
      });
    });
  });
  return {reduce_kd_loss(loss, r, grads), stats, grads.student, grads.teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CPU, m) { register_kernel<op::KdFwd>(m, &kd_fwd_cpu); }

}  // namespace agkd
