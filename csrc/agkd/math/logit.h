// The logit-KD family's per-class math: the KL family (teacher temperature, standardized
// logits, several or learnable temperatures), decoupled KD, OFA and DIST. Shared by the
// kernels of agkd::kd_family_fwd, dkd_fwd, ofa_fwd and dist_fwd (schemas in ops.cpp).
//
// Each of these ops computes its gradients in the forward pass, from the row while it is in
// cache, and the backward only scales them by the upstream gradient: their gradients need
// the row statistics of every term (several temperatures, the target / non-target split,
// the standardization), which a recomputing backward would have to rebuild at the cost of
// the forward again. Conventions as in math/kd.h: exponents of max-shifted logits only,
// log-probabilities as differences, 0·log 0 = 0 with NaN propagating.
#pragma once

#include <cmath>
#include <limits>

#include "agkd/math/common.h"
#include "agkd/math/kd.h"  // kl_term

namespace agkd {

// The temperatures a kernel accepts, as agkd_ops checks them (TEMPERATURE_RANGE, which a
// test holds equal to these): a tensor temperature outside, which the API cannot check on
// a GPU without a sync, makes its row's loss NaN.
constexpr double kMinTemperature = 1e-3, kMaxTemperature = 1e3;

template <typename T>
AGKD_HOST_DEVICE bool temperature_in_range(T tau) {
  return tau >= T(kMinTemperature) && tau <= T(kMaxTemperature);  // NaN fails both
}

// ------------------------------------------------------------------ standardization

// The z-score of one row, (z − mean) / (std + eps), std with Bessel's correction.
template <typename T>
struct RowStandardization {
  T mean, std, inv;  // inv = 1 / (std + eps)
};

template <typename T>
AGKD_HOST_DEVICE RowStandardization<T> make_standardization(T mean, T centered_square_sum, int64_t K, T eps) {
  const T std = std::sqrt(centered_square_sum / static_cast<T>(K - 1));
  return {mean, std, T(1) / (std + eps)};
}

// ∂L/∂z_i from ∂L/∂u_i through u = (z − μ)·inv, σ with Bessel's correction:
//   ∂L/∂z_i = inv·(g_i − ḡ) − u_i·G / ((K − 1)·σ),   ḡ = mean(g), G = Σ_k g_k u_k.
// A constant row (σ = 0, so u = 0) takes the first term only: σ's derivative does not
// exist there, and u_i = 0 makes its coefficient vanish.
template <typename T>
AGKD_HOST_DEVICE T standardized_grad(T g, T u, T g_mean, T g_dot_u, const RowStandardization<T>& st, int64_t K) {
  const T spread = st.std > T(0) ? u * g_dot_u / (static_cast<T>(K - 1) * st.std) : T(0);
  return st.inv * (g - g_mean) - spread;
}

// ------------------------------------------------------------------ the KL family

// One temperature's term of one row: with b = (u_s − max_s)/τ, a = (u_t − max_t)/τ_t,
//   L = τ²·KL(p_t ‖ p_s),  KL = w / z_t − log z_t + log z_s  (math/kd.h's sums)
// and, for the backward, the log-normalisers.
template <typename T>
struct KlTerm {
  T log_z_s, log_z_t, kl;
};

template <typename T>
AGKD_HOST_DEVICE KlTerm<T> make_kl_term(T z_s, T z_t, T w) {
  const T log_z_s = std::log(z_s), log_z_t = std::log(z_t);
  return {log_z_s, log_z_t, w / z_t - log_z_t + log_z_s};
}

// The gradients of τ²·KL at one class, from b and a of that class:
//   ∂/∂u_s = τ·(p_s − p_t),   ∂/∂u_t = (τ²/τ_t)·p_t·(log p_t − log p_s − KL),
// and the class's share of ∂/∂τ (τ the student's temperature; `tied` when the teacher's is
// the same variable):
//   ∂/∂τ = 2τ·KL − τ·Σ_k (p_s − p_t)·b_k − [tied] τ_t·Σ_k p_t·(log p_t − log p_s − KL)·a_k,
// whose sums over k are shift-invariant (each factor before b_k, a_k sums to 0), which is
// why the max-shifted b and a serve for the logits.
template <typename T>
struct KlGrads {
  T student, teacher, tau_share;  // tau_share: the class's part of the two sums
};

template <typename T, typename Exp>
AGKD_HOST_DEVICE KlGrads<T> kl_term_grads(const KlTerm<T>& term, T b, T a, T tau, T tau_t, bool tied, Exp exp_fn) {
  const T log_p_s = b - term.log_z_s, log_p_t = a - term.log_z_t;
  const T p_s = exp_fn(log_p_s), p_t = exp_fn(log_p_t);
  const T teacher_factor = p_t == T(0) ? T(0) : p_t * (log_p_t - log_p_s - term.kl);
  T share = -tau * (p_s - p_t) * b;
  if (tied) share -= tau_t * teacher_factor * a;
  return {tau * (p_s - p_t), tau * tau / tau_t * teacher_factor, share};
}

// ------------------------------------------------------------------ decoupled KD

// log-sum-exp of two log-values, stable for any sizes (−∞ allowed in one of them).
template <typename T>
AGKD_HOST_DEVICE T log_add_exp(T x, T y) {
  const T hi = x > y ? x : y, lo = x > y ? y : x;
  if (lo == -std::numeric_limits<T>::infinity()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// One side (student or teacher) of one row at temperature τ, shifted by the non-target
// maximum m_o: b_k = (z_k − m_o)/τ, and
//   log Z_o = log Σ_{k≠y} exp(b_k)       (the non-target normaliser, Z_o ≥ 1)
//   log Z   = log(Z_o + exp(b_y))        (all classes)
//   log b_1 = b_y − log Z = log p_y,  log b_2 = log Z_o − log Z = log(1 − p_y)
// so 1 − p_y never underflows to a log of 0, whatever the target's margin.
template <typename T>
struct DkdSide {
  T shift;      // m_o
  T log_z_o, log_z;
  T log_b1, log_b2;
  T b_target;   // b_y
};

template <typename T>
AGKD_HOST_DEVICE DkdSide<T> make_dkd_side(T shift, T z_other, T b_target) {
  DkdSide<T> side;
  side.shift = shift;
  side.b_target = b_target;
  side.log_z_o = std::log(z_other);
  side.log_z = log_add_exp(side.log_z_o, b_target);
  side.log_b1 = b_target - side.log_z;
  side.log_b2 = side.log_z_o - side.log_z;
  return side;
}

// p·log(p/q) with 0·log 0 = 0, from log-values.
template <typename T, typename Exp>
AGKD_HOST_DEVICE T xlogx_ratio(T log_p, T log_q, Exp exp_fn) {
  const T p = exp_fn(log_p);
  return p == T(0) ? T(0) : p * (log_p - log_q);
}

// The row's two terms and what the gradients need of them.
template <typename T>
struct DkdRow {
  T tckd, nckd;
  T bt1, bs1;       // p_t,y and p_s,y
  T tckd_r1, tckd_r2;  // b_t,j·(log b_t,j − log b_s,j − TCKD), 0 where b_t,j = 0
};

template <typename T, typename Exp>
AGKD_HOST_DEVICE DkdRow<T> make_dkd_row(const DkdSide<T>& s, const DkdSide<T>& t, T nckd_w, T nckd_z_t,
                                         Exp exp_fn) {
  DkdRow<T> row;
  row.tckd = xlogx_ratio(t.log_b1, s.log_b1, exp_fn) + xlogx_ratio(t.log_b2, s.log_b2, exp_fn);
  // KL(q_t ‖ q_s) = Σ_{k≠y} e^{a_k}(a_k − b_k) / Z_o,t − log Z_o,t + log Z_o,s
  row.nckd = nckd_w / nckd_z_t - t.log_z_o + s.log_z_o;
  row.bt1 = exp_fn(t.log_b1);
  row.bs1 = exp_fn(s.log_b1);
  const T bt2 = exp_fn(t.log_b2);
  row.tckd_r1 = row.bt1 == T(0) ? T(0) : row.bt1 * (t.log_b1 - s.log_b1 - row.tckd);
  row.tckd_r2 = bt2 == T(0) ? T(0) : bt2 * (t.log_b2 - s.log_b2 - row.tckd);
  return row;
}

// Both gradients at class k (before the factor τ·weights applied by the caller):
//   student: ∂TCKD/∂b_k = p_s,y − p_t,y at the target, q_s,k·(p_t,y − p_s,y) elsewhere;
//            ∂NCKD/∂b_k = q_s,k − q_t,k off the target, 0 at it;
//   teacher: ∂TCKD/∂a_k = r_1 at the target, q_t,k·r_2 elsewhere (r_j = b_t,j(log b_t,j −
//            log b_s,j − TCKD)); ∂NCKD/∂a_k = q_t,k(log q_t,k − log q_s,k − NCKD) off it.
template <typename T>
struct DkdGrads {
  T student, teacher;
};

template <typename T, typename Exp>
AGKD_HOST_DEVICE DkdGrads<T> dkd_grads_at(bool is_target, T b, T a, const DkdSide<T>& s, const DkdSide<T>& t,
                                          const DkdRow<T>& row, T tckd_weight, T nckd_weight, Exp exp_fn) {
  if (is_target) {
    return {tckd_weight * (row.bs1 - row.bt1), tckd_weight * row.tckd_r1};
  }
  const T log_q_s = b - s.log_z_o, log_q_t = a - t.log_z_o;
  const T q_s = exp_fn(log_q_s), q_t = exp_fn(log_q_t);
  const T nckd_teacher = q_t == T(0) ? T(0) : q_t * (log_q_t - log_q_s - row.nckd);
  return {tckd_weight * q_s * (row.bt1 - row.bs1) + nckd_weight * (q_s - q_t),
          tckd_weight * q_t * row.tckd_r2 + nckd_weight * nckd_teacher};
}

// ------------------------------------------------------------------ OFA

// The weight of log p_s,k in OFA's loss, ((p_t,k + m_k)^ε − m_k), and ε·(p_t,k + m_k)^(ε−1)·p_t,k
// (what ∂/∂a needs), from log p_t,k: off the target p^ε = exp(ε·log p), on it
// (1 + p)^ε − 1 = expm1(ε·log1p(p)), so neither underflows a small probability.
template <typename T>
struct OfaWeight {
  T weight, teacher_factor;
};

template <typename T, typename Exp>
AGKD_HOST_DEVICE OfaWeight<T> ofa_weight(bool is_target, T log_p_t, T eps, Exp exp_fn) {
  if (!is_target) {
    const T w = exp_fn(eps * log_p_t);
    return {w, eps * w};
  }
  const T p = exp_fn(log_p_t);
  const T log1p_p = std::log1p(p);
  return {std::expm1(eps * log1p_p), eps * std::exp((eps - T(1)) * log1p_p) * p};
}

// ------------------------------------------------------------------ DIST

// The Pearson correlation ρ = dot / (‖a‖·‖b‖ + eps) of two centred vectors and its
// gradients, ∂ρ/∂a_i = coef_b·b_i − coef_a·a_i (and symmetrically for b):
//   coef_b = 1 / D,  coef_a = dot·‖b‖ / (‖a‖·D²),  D = ‖a‖·‖b‖ + eps,
// with coef_a = 0 where ‖a‖ = 0 (as torch's norm backward has it at 0).
template <typename T>
struct Pearson {
  T rho;
  T inv_d;          // 1 / D
  T self_s, self_t; // coef of a_i in ∂ρ/∂a_i (student), of b_i in ∂ρ/∂b_i (teacher)
};

template <typename T>
AGKD_HOST_DEVICE Pearson<T> make_pearson(T dot, T square_s, T square_t, T eps) {
  const T norm_s = std::sqrt(square_s), norm_t = std::sqrt(square_t);
  const T d = norm_s * norm_t + eps;
  const T inv_d = T(1) / d;
  return {dot * inv_d, inv_d, norm_s > T(0) ? dot * norm_t / (norm_s * d * d) : T(0),
          norm_t > T(0) ? dot * norm_s / (norm_t * d * d) : T(0)};
}

}  // namespace agkd
