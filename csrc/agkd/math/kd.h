// Temperature-scaled KL divergence and Hinton KD loss of one row of logits, from
// per-row statistics. Shared by the CPU and CUDA kernels of agkd::kd_fwd.
//
// For one row, with a = t/τ (teacher) and b = s/τ (student):
//   KL   = Σ_k p_t,k (log p_t,k − log p_s,k),  p_t = softmax(a), p_s = softmax(b)
//   CE   = −Σ_k q'_k log softmax(s)_k            (temperature 1)
//   loss = ce_weight · CE + kl_weight · τ² · KL
// where q' is the target smoothed as F.cross_entropy smooths it, q'_k = (1 − ε)·q_k + ε/K,
// and q is the one-hot row of a class index or a given probability row.
// Every exponent is taken of a max-shifted logit, (x − max)/τ ≤ 0, so logits of any size
// give finite sums, and log-probabilities are formed as (x − max)/τ − log Z: differences
// of numbers of the size of the logits' spread, not of the logits themselves.
#pragma once

#include <cmath>
#include <limits>

#include "agkd/math/common.h"

namespace agkd {

// What the forward keeps per row for the backward (the (N, kKdStats) `stats` tensor).
enum KdStat : int {
  kStatMaxS = 0, kStatMaxT, kStatLogZS, kStatLogZT, kStatLogZCE, kStatKL, kStatCEMass, kKdStats
};

template <typename T>
struct KdRowStats {
  T max_s, max_t;     // row maxima of the raw logits
  T log_z_s, log_z_t; // log Σ_k exp((x_k − max)/τ), student and teacher
  T log_z_ce;         // log Σ_k exp(s_k − max_s), the cross-entropy's normaliser
  T kl;               // KL(p_t ‖ p_s) at temperature τ, before the τ² factor
  T ce_mass;          // Σ_k q'_k = (1 − ε)·Σ_k q_k + ε: softmax(s)'s weight in ∂CE/∂s
};

// The stats row of one sample, written by the forward and read back by the backward.
template <typename T>
AGKD_HOST_DEVICE void store_kd_stats(const KdRowStats<T>& st, T* out) {
  out[kStatMaxS] = st.max_s, out[kStatMaxT] = st.max_t, out[kStatLogZS] = st.log_z_s;
  out[kStatLogZT] = st.log_z_t, out[kStatLogZCE] = st.log_z_ce, out[kStatKL] = st.kl;
  out[kStatCEMass] = st.ce_mass;
}

template <typename T>
AGKD_HOST_DEVICE KdRowStats<T> load_kd_stats(const T* in) {
  return {in[kStatMaxS], in[kStatMaxT],  in[kStatLogZS],    in[kStatLogZT],
          in[kStatLogZCE], in[kStatKL], in[kStatCEMass]};
}

// The rows an ignore_index takes out: no loss, no gradient, not in the "mean" denominator.
struct RowMask {
  const int64_t* classes;  // the class targets (null when there are none)
  bool ignores;            // whether an ignore_index was given
  int64_t ignore_index;
  AGKD_HOST_DEVICE bool ignored(int64_t n) const { return ignores && classes[n] == ignore_index; }
};

// Label smoothing ε of the cross-entropy's target, as the kernels use it.
template <typename T>
struct Smoothing {
  T eps;     // ε
  T keep;    // 1 − ε: the weight of the given target
  T spread;  // ε / K: what every class receives
};

template <typename T>
AGKD_HOST_DEVICE Smoothing<T> make_smoothing(double eps, int64_t K) {
  return {static_cast<T>(eps), static_cast<T>(1.0 - eps), static_cast<T>(eps / static_cast<double>(K))};
}

// A probability target as the sums read it: a negative (or NaN) entry is not a
// probability, so it makes the row's loss NaN rather than a number. (The CPU host rejects
// such rows up front; the CUDA kernels cannot without syncing the device.)
template <typename T>
AGKD_HOST_DEVICE T target_probability(T q) {
  return q >= T(0) ? q : std::numeric_limits<T>::quiet_NaN();
}

// The sums of one row's second pass, taken with the row maxima as shifts.
template <typename T>
struct KdRowSums {
  T z_s = 0, z_t = 0;  // Σ exp(b̃_k), Σ exp(ã_k), with ã = (t − max_t)/τ, b̃ = (s − max_s)/τ
  T w = 0;             // Σ exp(ã_k) (ã_k − b̃_k)
  T z_ce = 0;          // Σ exp(s̃_k), s̃ = s − max_s
  T s_sum = 0;         // Σ s̃_k (label smoothing)
  T q_sum = 0, qs = 0; // Σ q_k and Σ q_k s̃_k (probability targets)
};

// exp(ã)·(ã − b̃) with the convention 0·log 0 = 0: a teacher logit of −∞ contributes
// nothing (instead of 0·∞ = NaN), while a NaN still propagates.
template <typename T>
AGKD_HOST_DEVICE T kl_term(T exp_a, T a, T b) {
  return exp_a == T(0) ? T(0) : exp_a * (a - b);
}

// One class's shifted logits and their exponentials, each taken once: the forward sums
// them and, when it also writes the gradient, normalises the same exponentials
// (kd_grads_from_exps).
template <typename T>
struct KdExps {
  T b = 0, a = 0, ce = 0;  // exp(b̃), exp(ã), exp(s̃)
};

template <typename T>
struct KdClass {
  T b = 0, a = 0, shifted = 0;  // b̃ = (s − max_s)/τ, ã = (t − max_t)/τ, s̃ = s − max_s
  KdExps<T> exps;
};

// `exp_fn` is the device's exp (a vectorisable one on the CPU, the CUDA intrinsic on the GPU).
template <bool kCE, bool kKL, typename T, typename Exp>
AGKD_HOST_DEVICE KdClass<T> kd_class(T s, T t, T max_s, T max_t, T inv_temperature, Exp exp_fn) {
  KdClass<T> c;
  if (kKL) {
    c.b = (s - max_s) * inv_temperature, c.a = (t - max_t) * inv_temperature;
    c.exps.b = exp_fn(c.b), c.exps.a = exp_fn(c.a);
  }
  if (kCE) c.shifted = s - max_s, c.exps.ce = exp_fn(c.shifted);
  return c;
}

// One class's contribution to the row sums; q is the probability target (kProb only).
template <bool kCE, bool kKL, bool kProb, typename T>
AGKD_HOST_DEVICE KdRowSums<T> kd_sum_terms_of(const KdClass<T>& c, T q) {
  KdRowSums<T> terms;
  if (kKL) terms.z_s = c.exps.b, terms.z_t = c.exps.a, terms.w = kl_term(c.exps.a, c.a, c.b);
  if (kCE) {
    terms.z_ce = c.exps.ce;
    terms.s_sum = c.shifted;
    if (kProb) {
      const T p = target_probability(q);
      terms.q_sum = p, terms.qs = p * c.shifted;
    }
  }
  return terms;
}

template <bool kCE, bool kKL, bool kProb, typename T, typename Exp>
AGKD_HOST_DEVICE KdRowSums<T> kd_sum_terms(T s, T t, T q, T max_s, T max_t, T inv_temperature,
                                           Exp exp_fn) {
  return kd_sum_terms_of<kCE, kKL, kProb>(kd_class<kCE, kKL>(s, t, max_s, max_t, inv_temperature, exp_fn), q);
}

// A term that is not computed (with_kl / with_ce false) leaves its statistics at 0, so
// that the saved stats are always finite where the logits are.
template <typename T, typename Sum>
AGKD_HOST_DEVICE KdRowStats<T> kd_row_stats(T max_s, T max_t, const KdRowSums<Sum>& sums,
                                            bool with_kl, bool with_ce) {
  KdRowStats<T> st{max_s, T(0), T(0), T(0), T(0), T(0), T(0)};
  if (with_kl) {
    st.max_t = max_t;
    st.log_z_s = static_cast<T>(std::log(sums.z_s));
    st.log_z_t = static_cast<T>(std::log(sums.z_t));
    // Σ p_t (log p_t − log p_s) = w / z_t − log z_t + log z_s
    st.kl = static_cast<T>(sums.w / sums.z_t - std::log(sums.z_t) + std::log(sums.z_s));
  }
  if (with_ce) st.log_z_ce = static_cast<T>(std::log(sums.z_ce));
  return st;
}

// What the cross-entropy needs of one row's target: its total smoothed mass Σ_k q'_k and
// Σ_k q_k s̃_k.
template <typename T>
struct CeTargetSums {
  T mass, qs;
};

// A class index y: mass exactly 1 (as F.cross_entropy has it), and s̃_y (NaN for y outside
// [0, K): see kd_target_logit).
template <typename T>
AGKD_HOST_DEVICE CeTargetSums<T> class_target_sums(T shifted_target_logit) {
  return {T(1), shifted_target_logit};
}

// A probability row q, used as given (F.cross_entropy does not normalise it either).
template <typename T>
AGKD_HOST_DEVICE CeTargetSums<T> probability_target_sums(T q_sum, T qs, const Smoothing<T>& smoothing) {
  return {smoothing.keep * q_sum + smoothing.eps, qs};
}

// The cross-entropy of one row, smoothed:
//   CE = Σ_k q'_k (log z_ce − s̃_k) = log z_ce · mass − (1 − ε)·Σ q s̃ − ε/K · Σ s̃.
// Sets st.ce_mass. Without smoothing and with a class index this is log z_ce − s̃_y.
template <typename T>
AGKD_HOST_DEVICE T kd_row_ce(KdRowStats<T>& st, const CeTargetSums<T>& target, T s_sum,
                             const Smoothing<T>& smoothing) {
  st.ce_mass = target.mass;
  T ce = st.log_z_ce * target.mass - smoothing.keep * target.qs;
  if (smoothing.eps != T(0)) ce -= smoothing.spread * s_sum;
  return ce;
}

// Loss of one row from its stats and cross-entropy (unused when ce_weight is 0).
template <typename T>
AGKD_HOST_DEVICE T kd_row_loss(const KdRowStats<T>& st, T ce, T temperature, T ce_weight,
                               T kl_weight) {
  T loss = 0;  // a term with weight 0 is not computed at all: skip it, NaN stats included
  if (kl_weight != T(0)) loss += kl_weight * temperature * temperature * st.kl;
  if (ce_weight != T(0)) loss += ce_weight * ce;
  return loss;
}

// The student's logit at the target class, or NaN for a target outside [0, K): never an
// out-of-bounds read. The CPU host rejects such targets before the kernel runs
// (cpu/kd_cpu.cpp); on CUDA, where checking would sync the device, the row's loss is NaN.
AGKD_HOST_DEVICE bool kd_class_in_range(int64_t target, int64_t K) {
  return target >= 0 && target < K;
}

template <typename T, typename Load>
AGKD_HOST_DEVICE T kd_target_logit(int64_t target, int64_t K, const Load& load) {
  return kd_class_in_range(target, K) ? load(target) : std::numeric_limits<T>::quiet_NaN();
}

// Per-row coefficients of the backward: the row's upstream gradient folded in once.
template <typename T>
struct KdGradCoeffs {
  T kl;  // grad_loss · kl_weight · τ   (τ² · ∂/∂x of KL(a, b) brings one 1/τ)
  T ce;  // grad_loss · ce_weight
};

template <typename T>
AGKD_HOST_DEVICE KdGradCoeffs<T> kd_grad_coeffs(T grad_loss, T temperature, T ce_weight,
                                                T kl_weight) {
  return {grad_loss * kl_weight * temperature, grad_loss * ce_weight};
}

// The log-probabilities of one class at temperature τ (and of the student at 1).
template <typename T>
struct KdLogProbs {
  T log_p_s, log_p_t, log_p_ce;
};

template <typename T>
AGKD_HOST_DEVICE KdLogProbs<T> kd_log_probs(const KdRowStats<T>& st, T s, T t,
                                            T inv_temperature) {
  return {(s - st.max_s) * inv_temperature - st.log_z_s,
          (t - st.max_t) * inv_temperature - st.log_z_t, (s - st.max_s) - st.log_z_ce};
}

// ∂loss/∂s_k = c.kl (p_s,k − p_t,k) + c.ce (ce_mass · softmax(s)_k − (1 − ε) q_k − ε/K),
// given p_s,k = exp(log_p_s), p_t,k = exp(log_p_t), softmax(s)_k = exp(log_p_ce), and q_k
// the target's probability of class k ([k = y] for a class index).
template <typename T>
AGKD_HOST_DEVICE T kd_student_grad(const KdGradCoeffs<T>& c, T p_s, T p_t, T softmax, T q,
                                   T ce_mass, const Smoothing<T>& smoothing) {
  return c.kl * (p_s - p_t) + c.ce * (ce_mass * softmax - smoothing.keep * q - smoothing.spread);
}

// ∂loss/∂t_k = c.kl · p_t,k (log p_t,k − log p_s,k − KL), with 0 where p_t,k = 0.
template <typename T>
AGKD_HOST_DEVICE T kd_teacher_grad(const KdGradCoeffs<T>& c, T kl, T p_t, T log_p_t, T log_p_s) {
  return p_t == T(0) ? T(0) : c.kl * p_t * (log_p_t - log_p_s - kl);
}

template <typename T>
struct KdGradPair {
  T student, teacher;
};

// The row's normalisers 1/Σ, so that a probability is its exponential times one factor.
template <typename T>
struct KdInverseSums {
  T z_s, z_t, z_ce;
};

template <typename T>
AGKD_HOST_DEVICE KdInverseSums<T> kd_inverse_sums(const KdRowStats<T>& st) {
  return {std::exp(-st.log_z_s), std::exp(-st.log_z_t), std::exp(-st.log_z_ce)};
}

// Both gradients at one class k from the exponentials the forward's sums took (no exp is
// taken again): p = exp · (1/Σ); the log-probabilities, for the teacher's gradient, as
// kd_grads_at forms them.
template <bool kCE, bool kKL, typename T>
AGKD_HOST_DEVICE KdGradPair<T> kd_grads_from_exps(const KdRowStats<T>& st, const KdInverseSums<T>& inv,
                                                  const KdGradCoeffs<T>& c, const KdExps<T>& e, T s, T t, T q,
                                                  const Smoothing<T>& smoothing, T inv_temperature) {
  const T p_s = kKL ? e.b * inv.z_s : T(0);
  const T p_t = kKL ? e.a * inv.z_t : T(0);
  const T softmax = kCE ? e.ce * inv.z_ce : T(0);
  T teacher = 0;
  if (kKL) {
    const KdLogProbs<T> lp = kd_log_probs(st, s, t, inv_temperature);
    teacher = kd_teacher_grad(c, st.kl, p_t, lp.log_p_t, lp.log_p_s);
  }
  return {kd_student_grad(c, p_s, p_t, softmax, q, st.ce_mass, smoothing), teacher};
}

// Both gradients at one class k of a row (teacher 0 when the KL term is off); q is the
// target's probability of class k.
template <bool kCE, bool kKL, typename T, typename Exp>
AGKD_HOST_DEVICE KdGradPair<T> kd_grads_at(const KdRowStats<T>& st, const KdGradCoeffs<T>& c,
                                           T s, T t, T q, const Smoothing<T>& smoothing,
                                           T inv_temperature, Exp exp_fn) {
  const KdLogProbs<T> lp = kd_log_probs(st, s, t, inv_temperature);
  const T p_s = kKL ? exp_fn(lp.log_p_s) : T(0);
  const T p_t = kKL ? exp_fn(lp.log_p_t) : T(0);
  const T softmax = kCE ? exp_fn(lp.log_p_ce) : T(0);
  return {kd_student_grad(c, p_s, p_t, softmax, q, st.ce_mass, smoothing),
          kKL ? kd_teacher_grad(c, st.kl, p_t, lp.log_p_t, lp.log_p_s) : T(0)};
}

}  // namespace agkd
