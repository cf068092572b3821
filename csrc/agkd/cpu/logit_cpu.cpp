// CPU kernels of the logit-KD family: agkd::kd_family_fwd, dkd_fwd, ofa_fwd, dist_fwd.
//
// Each op computes its loss and its gradients in one call (csrc/agkd/logit.h says what
// the gradient outputs are, math/logit.h why). Rows are independent and at::parallel_for
// hands out whole rows, so every sum is taken in one fixed order whatever the thread
// count: a row is read from memory once, converted to the accumulate dtype where needed,
// and swept a few times while it is in cache (maximum, sums, gradients). Sums run in
// acc_t lanes over chunks of kChunk classes and then in double, as in cpu/kd_cpu.cpp.
// DIST's intra-class term couples the rows: a row pass writes the probabilities, a
// column pass (over blocks of classes) reduces them over the batch, and a last row pass
// writes the gradients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "agkd/cpu/rows.h"
#include "agkd/cpu/vectorize.h"
#include "agkd/logit.h"
#include "agkd/math/logit.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

constexpr int64_t kLogitsPerTask = 16384;  // rows per parallel task: at least this many logits
constexpr int64_t kChunk = 1024;           // classes summed in acc_t lanes before double

int64_t rows_per_task(int64_t K) { return std::max<int64_t>(1, kLogitsPerTask / K); }

// Σ_{k in [begin, end)} f(k) for up to three quantities, in acc_t lanes per chunk, then in
// double. `f(k, a, b, c)` adds class k's terms to a, b, c.
template <typename acc_t, typename Terms>
AGKD_CPU_INLINE void sum3(int64_t begin, int64_t end, const Terms& f, double& a, double& b, double& c) {
  for (int64_t k0 = begin; k0 < end; k0 += kChunk) {
    const int64_t k1 = std::min(end, k0 + kChunk);
    acc_t x = 0, y = 0, z = 0;
    AGKD_SIMD_REDUCTION(+ : x, y, z)
    for (int64_t k = k0; k < k1; ++k) f(k, x, y, z);
    a += x, b += y, c += z;
  }
}

// Σ_{k in [begin, end)} f(k) for one quantity, as sum3 takes it.
template <typename acc_t, typename Term>
AGKD_CPU_INLINE double sum1(int64_t begin, int64_t end, const Term& f) {
  double total = 0, unused_b = 0, unused_c = 0;
  sum3<acc_t>(begin, end, [&](int64_t k, acc_t& a, acc_t&, acc_t&) { a += f(k); }, total, unused_b, unused_c);
  return total;
}

// A row's gradient in acc_t, written out scaled by the reduction's factor.
template <typename acc_t>
AGKD_CPU_INLINE void store_scaled(const acc_t* __restrict g, int64_t K, acc_t scale, acc_t* __restrict out) {
  AGKD_SIMD
  for (int64_t k = 0; k < K; ++k) out[k] = g[k] * scale;
}

// Class targets checked on the host before any logit is read (a ValueError, never an
// out-of-bounds read).
void check_class_range(const char* fn, const at::Tensor& target, int64_t K) {
  const int64_t* classes = target.const_data_ptr<int64_t>();
  const int64_t N = target.size(0);
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
  for (int64_t n = 0; n < N; ++n) lo = std::min(lo, classes[n]), hi = std::max(hi, classes[n]);
  TORCH_CHECK_VALUE(lo >= 0 && hi < K, "agkd_ops.", fn, ": target must hold class indices in [0, ", K,
                    ") for K=", K, " classes, got values from ", lo, " to ", hi);
}

// ============================================================ agkd::kd_family_fwd

// (N, M) temperatures, read with their strides.
template <typename acc_t>
struct Temperatures {
  const acc_t* data;
  int64_t sN, sM, M;
  explicit Temperatures(const at::Tensor& t)
      : data(t.const_data_ptr<acc_t>()), sN(t.stride(0)), sM(t.stride(1)), M(t.size(1)) {}
  acc_t at(int64_t n, int64_t m) const { return data[n * sN + m * sM]; }
};

// One side's logits as the KL terms read them: the row itself, or its z-score in `buffer`.
template <typename acc_t>
AGKD_CPU_INLINE const acc_t* standardized_row(const acc_t* z, int64_t K, acc_t eps, std::vector<acc_t>& buffer,
                                              RowStandardization<acc_t>& st) {
  const acc_t mean = static_cast<acc_t>(sum1<acc_t>(0, K, [&](int64_t k) { return z[k]; }) / static_cast<double>(K));
  const double square = sum1<acc_t>(0, K, [&](int64_t k) { return (z[k] - mean) * (z[k] - mean); });
  st = make_standardization<acc_t>(mean, static_cast<acc_t>(square), K, eps);
  buffer.resize(K);
  AGKD_SIMD
  for (int64_t k = 0; k < K; ++k) buffer[k] = (z[k] - mean) * st.inv;
  return buffer.data();
}

// The chain rule through the z-score, in place: g (∂L/∂u) becomes ∂L/∂z.
template <typename acc_t>
AGKD_CPU_INLINE void standardized_backward(acc_t* g, const acc_t* u, int64_t K, const RowStandardization<acc_t>& st) {
  double g_sum = 0, g_dot_u = 0, unused = 0;
  sum3<acc_t>(0, K, [&](int64_t k, acc_t& a, acc_t& b, acc_t&) { a += g[k], b += g[k] * u[k]; }, g_sum, g_dot_u,
              unused);
  const acc_t g_mean = static_cast<acc_t>(g_sum / static_cast<double>(K));
  const acc_t dot = static_cast<acc_t>(g_dot_u);
  for (int64_t k = 0; k < K; ++k) g[k] = standardized_grad(g[k], u[k], g_mean, dot, st, K);
}

template <typename scalar_t>
struct FamilyArgs {
  using acc_t = at::opmath_type<scalar_t>;
  LogitRows<scalar_t> student, teacher;
  Temperatures<acc_t> tau, tau_t;
  bool tied, standardize;
  acc_t standardize_eps;
  acc_t scale;  // the reduction's factor of the gradients
  acc_t *loss, *grad_s, *grad_t, *grad_tau;  // grads null where not asked for
};

template <typename scalar_t, bool kTied>
AGKD_CPU_MULTIVERSION void kd_family_rows(const FamilyArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = a.student.K, M = a.tau.M;
  const bool grads = a.grad_s || a.grad_t || a.grad_tau;
  std::vector<acc_t> s_buf, t_buf, us_buf, ut_buf, gs(K), gt(K);
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* s = a.student.row(n, s_buf);
    const acc_t* t = a.teacher.row(n, t_buf);
    RowStandardization<acc_t> st_s{}, st_t{};
    const acc_t* us = a.standardize ? standardized_row(s, K, a.standardize_eps, us_buf, st_s) : s;
    const acc_t* ut = a.standardize ? standardized_row(t, K, a.standardize_eps, ut_buf, st_t) : t;
    const acc_t max_s = row_max(us, K), max_t = row_max(ut, K);
    if (grads) std::fill(gs.begin(), gs.end(), acc_t(0)), std::fill(gt.begin(), gt.end(), acc_t(0));
    double loss = 0;
    for (int64_t m = 0; m < M; ++m) {
      acc_t tau = a.tau.at(n, m), tau_t = kTied ? tau : a.tau_t.at(n, m);
      if (!temperature_in_range(tau) || !temperature_in_range(tau_t)) {
        tau = tau_t = std::numeric_limits<acc_t>::quiet_NaN();
      }
      const acc_t inv_tau = acc_t(1) / tau, inv_tau_t = acc_t(1) / tau_t;
      double z_s = 0, z_t = 0, w = 0;
      sum3<acc_t>(0, K, [&](int64_t k, acc_t& zs, acc_t& zt, acc_t& ww) {
        const acc_t b = (us[k] - max_s) * inv_tau, at = (ut[k] - max_t) * inv_tau_t;
        const acc_t ea = exp_simd(at);
        zs += exp_simd(b), zt += ea, ww += kl_term(ea, at, b);
      }, z_s, z_t, w);
      const KlTerm<double> term_d = make_kl_term(z_s, z_t, w);
      loss += static_cast<double>(tau) * tau * term_d.kl;
      if (!grads) continue;
      const KlTerm<acc_t> term{static_cast<acc_t>(term_d.log_z_s), static_cast<acc_t>(term_d.log_z_t),
                               static_cast<acc_t>(term_d.kl)};
      acc_t share = 0;
      AGKD_SIMD_REDUCTION(+ : share)
      for (int64_t k = 0; k < K; ++k) {
        const acc_t b = (us[k] - max_s) * inv_tau, at = (ut[k] - max_t) * inv_tau_t;
        const KlGrads<acc_t> g = kl_term_grads(term, b, at, tau, tau_t, kTied, SimdExp{});
        gs[k] += g.student, gt[k] += g.teacher, share += g.tau_share;
      }
      if (a.grad_tau) a.grad_tau[n * M + m] = (acc_t(2) * tau * term.kl + share) * a.scale;
    }
    a.loss[n] = static_cast<acc_t>(loss);
    if (a.standardize) {
      if (a.grad_s) standardized_backward(gs.data(), us, K, st_s);
      if (a.grad_t) standardized_backward(gt.data(), ut, K, st_t);
    }
    if (a.grad_s) store_scaled(gs.data(), K, a.scale, a.grad_s + n * K);
    if (a.grad_t) store_scaled(gt.data(), K, a.scale, a.grad_t + n * K);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_family_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const std::optional<at::Tensor>& teacher_temperature, bool standardize, double standardize_eps,
    c10::string_view reduction, bool needs_grad_student, bool needs_grad_teacher, bool needs_grad_temperature) {
  KdFamilyCall call = prepare_kd_family(student, teacher, temperature, teacher_temperature, standardize,
                                        standardize_eps, reduction, needs_grad_student, needs_grad_teacher,
                                        needs_grad_temperature);
  const Reduction r = call.out.reduction;
  const int64_t N = call.out.N, K = call.out.K;
  at::Tensor &loss = call.out.loss, &grad_s = call.out.grad_s, &grad_t = call.out.grad_t;
  const bool tied = call.tied;
  at::Tensor& grad_tau = call.grad_tau;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_family_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FamilyArgs<scalar_t> args{LogitRows<scalar_t>(student),
                                    LogitRows<scalar_t>(teacher),
                                    Temperatures<acc_t>(temperature),
                                    Temperatures<acc_t>(tied ? temperature : *teacher_temperature),
                                    tied,
                                    standardize,
                                    static_cast<acc_t>(standardize_eps),
                                    static_cast<acc_t>(output_grad_scale(r, N)),
                                    loss.mutable_data_ptr<acc_t>(),
                                    needs_grad_student ? grad_s.mutable_data_ptr<acc_t>() : nullptr,
                                    needs_grad_teacher ? grad_t.mutable_data_ptr<acc_t>() : nullptr,
                                    needs_grad_temperature ? grad_tau.mutable_data_ptr<acc_t>() : nullptr};
    dispatch_flag(tied, [&]<bool kTied>() {
      at::parallel_for(0, N, rows_per_task(K), [&](int64_t begin, int64_t end) {
        kd_family_rows<scalar_t, kTied>(args, begin, end);
      });
    });
  });
  return {reduce_loss(loss, r), grad_s, grad_t, grad_tau};
}

// ============================================================ agkd::dkd_fwd

template <typename scalar_t>
struct DkdArgs {
  using acc_t = at::opmath_type<scalar_t>;
  LogitRows<scalar_t> student, teacher;
  const int64_t* classes;
  acc_t tau, tckd_weight, nckd_weight, scale;
  acc_t *loss, *grad_s, *grad_t;
};

// One side of a DKD row (math/logit.h, DkdSide): the non-target maximum and normaliser.
template <typename acc_t>
AGKD_CPU_INLINE DkdSide<acc_t> dkd_side(const acc_t* z, int64_t K, int64_t y, acc_t inv_tau) {
  const acc_t shift = std::max(row_max(z, y), row_max(z + y + 1, K - y - 1));
  const auto term = [&](int64_t k) { return exp_simd((z[k] - shift) * inv_tau); };
  const double z_other = sum1<acc_t>(0, y, term) + sum1<acc_t>(y + 1, K, term);
  return make_dkd_side<acc_t>(shift, static_cast<acc_t>(z_other), (z[y] - shift) * inv_tau);
}

template <typename scalar_t>
AGKD_CPU_MULTIVERSION void dkd_rows(const DkdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = a.student.K;
  const acc_t inv_tau = acc_t(1) / a.tau, grad_factor = a.tau * a.scale;  // τ²·(1/τ)
  std::vector<acc_t> s_buf, t_buf;
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* s = a.student.row(n, s_buf);
    const acc_t* t = a.teacher.row(n, t_buf);
    const int64_t y = a.classes[n];
    const DkdSide<acc_t> ss = dkd_side(s, K, y, inv_tau), ts = dkd_side(t, K, y, inv_tau);
    // NCKD's Σ_{k≠y} e^{a_k}(a_k − b_k) with both sides shifted by their non-target maxima
    double w = 0, z_t = 0, unused = 0;
    const auto terms = [&](int64_t k, acc_t& ww, acc_t& zt, acc_t&) {
      const acc_t b = (s[k] - ss.shift) * inv_tau, at = (t[k] - ts.shift) * inv_tau;
      const acc_t ea = exp_simd(at);
      ww += kl_term(ea, at, b), zt += ea;
    };
    sum3<acc_t>(0, y, terms, w, z_t, unused);
    sum3<acc_t>(y + 1, K, terms, w, z_t, unused);
    const DkdRow<acc_t> row = make_dkd_row(ss, ts, static_cast<acc_t>(w), static_cast<acc_t>(z_t), SimdExp{});
    a.loss[n] = a.tau * a.tau * (a.tckd_weight * row.tckd + a.nckd_weight * row.nckd);
    if (!a.grad_s && !a.grad_t) continue;
    acc_t* gs = a.grad_s ? a.grad_s + n * K : nullptr;
    acc_t* gt = a.grad_t ? a.grad_t + n * K : nullptr;
    // Every class with the non-target formulas (a branch-free lane loop), then the target.
    AGKD_SIMD
    for (int64_t k = 0; k < K; ++k) {
      const acc_t b = (s[k] - ss.shift) * inv_tau, at = (t[k] - ts.shift) * inv_tau;
      const DkdGrads<acc_t> g = dkd_grads_at(false, b, at, ss, ts, row, a.tckd_weight, a.nckd_weight, SimdExp{});
      if (gs) gs[k] = grad_factor * g.student;
      if (gt) gt[k] = grad_factor * g.teacher;
    }
    const DkdGrads<acc_t> g_y = dkd_grads_at(true, ss.b_target, ts.b_target, ss, ts, row, a.tckd_weight,
                                             a.nckd_weight, SimdExp{});
    if (gs) gs[y] = grad_factor * g_y.student;
    if (gt) gt[y] = grad_factor * g_y.teacher;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           const at::Tensor& target, double temperature,
                                                           double tckd_weight, double nckd_weight,
                                                           c10::string_view reduction, bool needs_grad_student,
                                                           bool needs_grad_teacher) {
  TargetLossCall call = prepare_dkd(student, teacher, target, temperature, tckd_weight, nckd_weight, reduction,
                                    needs_grad_student, needs_grad_teacher);
  const Reduction r = call.out.reduction;
  const int64_t N = call.out.N, K = call.out.K;
  at::Tensor &loss = call.out.loss, &grad_s = call.out.grad_s, &grad_t = call.out.grad_t;
  const at::Tensor& classes = call.classes;
  check_class_range("dkd_loss", classes, K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "dkd_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DkdArgs<scalar_t> args{LogitRows<scalar_t>(student),
                                 LogitRows<scalar_t>(teacher),
                                 classes.const_data_ptr<int64_t>(),
                                 static_cast<acc_t>(temperature),
                                 static_cast<acc_t>(tckd_weight),
                                 static_cast<acc_t>(nckd_weight),
                                 static_cast<acc_t>(output_grad_scale(r, N)),
                                 loss.mutable_data_ptr<acc_t>(),
                                 needs_grad_student ? grad_s.mutable_data_ptr<acc_t>() : nullptr,
                                 needs_grad_teacher ? grad_t.mutable_data_ptr<acc_t>() : nullptr};
    at::parallel_for(0, N, rows_per_task(K), [&](int64_t begin, int64_t end) { dkd_rows<scalar_t>(args, begin, end); });
  });
  return {reduce_loss(loss, r), grad_s, grad_t};
}

// ============================================================ agkd::ofa_fwd

template <typename scalar_t>
struct OfaArgs {
  using acc_t = at::opmath_type<scalar_t>;
  LogitRows<scalar_t> student, teacher;
  const int64_t* classes;
  acc_t tau, eps, scale;
  acc_t *loss, *grad_s, *grad_t;
};

// Per row, with b = (s − max_s)/τ, a = (t − max_t)/τ, w_k = OFA's weight (math/logit.h):
//   loss = −Σ w_k log p_s,k;  ∂/∂s_j = (W·p_s,j − w_j)/τ, W = Σ w_k;
//   ∂/∂t_j = (e_j − p_t,j·E)/τ, e_k = −(∂w_k/∂log p_t,k)·log p_s,k, E = Σ e_k.
template <typename scalar_t>
AGKD_CPU_MULTIVERSION void ofa_rows(const OfaArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = a.student.K;
  const acc_t inv_tau = acc_t(1) / a.tau, grad_factor = a.scale * inv_tau;
  std::vector<acc_t> s_buf, t_buf, weight(K), teacher_e(K);
  for (int64_t n = begin; n < end; ++n) {
    const acc_t* s = a.student.row(n, s_buf);
    const acc_t* t = a.teacher.row(n, t_buf);
    const int64_t y = a.classes[n];
    const acc_t max_s = row_max(s, K), max_t = row_max(t, K);
    double z_s = 0, z_t = 0, unused = 0;
    sum3<acc_t>(0, K, [&](int64_t k, acc_t& zs, acc_t& zt, acc_t&) {
      zs += exp_simd((s[k] - max_s) * inv_tau), zt += exp_simd((t[k] - max_t) * inv_tau);
    }, z_s, z_t, unused);
    const acc_t log_z_s = static_cast<acc_t>(std::log(z_s)), log_z_t = static_cast<acc_t>(std::log(z_t));
    // Off-target weights in a branch-free lane loop (then the target class is redone):
    // w_k = p_t,k^ε and e_k = −ε·w_k·log p_s,k, with 0·log 0 = 0.
    double loss_l = 0, weight_l = 0, e_l = 0;
    sum3<acc_t>(0, K, [&](int64_t k, acc_t& lo, acc_t& we, acc_t& e) {
      const acc_t log_p_s = (s[k] - max_s) * inv_tau - log_z_s, log_p_t = (t[k] - max_t) * inv_tau - log_z_t;
      const OfaWeight<acc_t> w = ofa_weight(false, log_p_t, a.eps, SimdExp{});
      weight[k] = w.weight;
      teacher_e[k] = w.teacher_factor == acc_t(0) ? acc_t(0) : -w.teacher_factor * log_p_s;
      lo -= w.weight == acc_t(0) ? acc_t(0) : w.weight * log_p_s;
      we += w.weight, e += teacher_e[k];
    }, loss_l, weight_l, e_l);
    {
      const acc_t log_p_s = (s[y] - max_s) * inv_tau - log_z_s, log_p_t = (t[y] - max_t) * inv_tau - log_z_t;
      const OfaWeight<acc_t> w = ofa_weight(true, log_p_t, a.eps, SimdExp{});
      const acc_t e_y = w.teacher_factor == acc_t(0) ? acc_t(0) : -w.teacher_factor * log_p_s;
      loss_l += static_cast<double>(weight[y] == acc_t(0) ? acc_t(0) : weight[y] * log_p_s) -
                static_cast<double>(w.weight == acc_t(0) ? acc_t(0) : w.weight * log_p_s);
      weight_l += static_cast<double>(w.weight) - weight[y], e_l += static_cast<double>(e_y) - teacher_e[y];
      weight[y] = w.weight, teacher_e[y] = e_y;
    }
    const double loss = loss_l, weight_sum = weight_l, e_sum = e_l;
    a.loss[n] = static_cast<acc_t>(loss);
    const acc_t W = static_cast<acc_t>(weight_sum), E = static_cast<acc_t>(e_sum);
    if (a.grad_s) {
      acc_t* g = a.grad_s + n * K;
      AGKD_SIMD
      for (int64_t k = 0; k < K; ++k) {
        g[k] = grad_factor * (W * exp_simd((s[k] - max_s) * inv_tau - log_z_s) - weight[k]);
      }
    }
    if (a.grad_t) {
      acc_t* g = a.grad_t + n * K;
      AGKD_SIMD
      for (int64_t k = 0; k < K; ++k) {
        g[k] = grad_factor * (teacher_e[k] - exp_simd((t[k] - max_t) * inv_tau - log_z_t) * E);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ofa_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           const at::Tensor& target, double temperature, double eps,
                                                           c10::string_view reduction, bool needs_grad_student,
                                                           bool needs_grad_teacher) {
  TargetLossCall call = prepare_ofa(student, teacher, target, temperature, eps, reduction, needs_grad_student,
                                    needs_grad_teacher);
  const Reduction r = call.out.reduction;
  const int64_t N = call.out.N, K = call.out.K;
  at::Tensor &loss = call.out.loss, &grad_s = call.out.grad_s, &grad_t = call.out.grad_t;
  const at::Tensor& classes = call.classes;
  check_class_range("ofa_loss", classes, K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ofa_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const OfaArgs<scalar_t> args{LogitRows<scalar_t>(student),
                                 LogitRows<scalar_t>(teacher),
                                 classes.const_data_ptr<int64_t>(),
                                 static_cast<acc_t>(temperature),
                                 static_cast<acc_t>(eps),
                                 static_cast<acc_t>(output_grad_scale(r, N)),
                                 loss.mutable_data_ptr<acc_t>(),
                                 needs_grad_student ? grad_s.mutable_data_ptr<acc_t>() : nullptr,
                                 needs_grad_teacher ? grad_t.mutable_data_ptr<acc_t>() : nullptr};
    at::parallel_for(0, N, rows_per_task(K), [&](int64_t begin, int64_t end) { ofa_rows<scalar_t>(args, begin, end); });
  });
  return {reduce_loss(loss, r), grad_s, grad_t};
}

// ============================================================ agkd::dist_fwd

constexpr int64_t kColumnBlock = 256;  // classes per task of the column pass

// Row pass: p = softmax(z/τ) into `p` (N, K), and each row's centred sums
// (Σ c_s c_t, Σ c_s², Σ c_t² with c = p − mean(p)).
template <typename scalar_t>
AGKD_CPU_INLINE void dist_probabilities(const LogitRows<scalar_t>& z, at::opmath_type<scalar_t> inv_tau, int64_t n,
                        std::vector<at::opmath_type<scalar_t>>& buffer, at::opmath_type<scalar_t>* p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = z.K;
  const acc_t* row = z.row(n, buffer);
  const acc_t max = row_max(row, K);
  AGKD_SIMD
  for (int64_t k = 0; k < K; ++k) p[k] = exp_simd((row[k] - max) * inv_tau);
  const double total = sum1<acc_t>(0, K, [&](int64_t k) { return p[k]; });
  const acc_t inv_total = static_cast<acc_t>(1.0 / total);
  AGKD_SIMD
  for (int64_t k = 0; k < K; ++k) p[k] *= inv_total;
}

template <typename acc_t>
AGKD_CPU_INLINE Pearson<acc_t> centred_pearson(const acc_t* a, const acc_t* b, int64_t K, acc_t eps) {
  double sum_a = 0, sum_b = 0, unused = 0;
  sum3<acc_t>(0, K, [&](int64_t k, acc_t& x, acc_t& y, acc_t&) { x += a[k], y += b[k]; }, sum_a, sum_b, unused);
  const acc_t mean_a = static_cast<acc_t>(sum_a / K), mean_b = static_cast<acc_t>(sum_b / K);
  double dot = 0, sq_a = 0, sq_b = 0;
  sum3<acc_t>(0, K, [&](int64_t k, acc_t& d, acc_t& x, acc_t& y) {
    const acc_t ca = a[k] - mean_a, cb = b[k] - mean_b;
    d += ca * cb, x += ca * ca, y += cb * cb;
  }, dot, sq_a, sq_b);
  return make_pearson<acc_t>(static_cast<acc_t>(dot), static_cast<acc_t>(sq_a), static_cast<acc_t>(sq_b),
                             eps);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_typed(const at::Tensor& student, const at::Tensor& teacher,
                                                          double temperature, double inter_weight,
                                                          double intra_weight, at::opmath_type<scalar_t> eps,
                                                          bool needs_s, bool needs_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = student.size(0), K = student.size(1);
  const auto acc_options = student.options().dtype(accumulate_dtype(student.scalar_type()));
  at::Tensor probs_s = at::empty({N, K}, acc_options), probs_t = at::empty({N, K}, acc_options);
  at::Tensor row_pearson = at::empty({N, 4}, acc_options);  // rho, inv_d, self_s, self_t
  acc_t* ps = probs_s.mutable_data_ptr<acc_t>();
  acc_t* pt = probs_t.mutable_data_ptr<acc_t>();
  acc_t* rows = row_pearson.mutable_data_ptr<acc_t>();
  const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature);
  const LogitRows<scalar_t> zs(student), zt(teacher);
  at::parallel_for(0, N, rows_per_task(K), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer;
    for (int64_t n = begin; n < end; ++n) {
      dist_probabilities(zs, inv_tau, n, buffer, ps + n * K);
      dist_probabilities(zt, inv_tau, n, buffer, pt + n * K);
      const Pearson<acc_t> r = centred_pearson(ps + n * K, pt + n * K, K, eps);
      rows[4 * n] = r.rho, rows[4 * n + 1] = r.inv_d, rows[4 * n + 2] = r.self_s, rows[4 * n + 3] = r.self_t;
    }
  });
  // Column pass: each class column over the batch, in double, rows in order.
  std::vector<acc_t> col_mean_s(K), col_mean_t(K), col_rho(K), col_inv_d(K), col_self_s(K), col_self_t(K);
  at::parallel_for(0, K, kColumnBlock, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<double> sum_s(width, 0.0), sum_t(width, 0.0), dot(width, 0.0), sq_s(width, 0.0), sq_t(width, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < width; ++j) sum_s[j] += ps[n * K + begin + j], sum_t[j] += pt[n * K + begin + j];
    }
    for (int64_t j = 0; j < width; ++j) {
      col_mean_s[begin + j] = static_cast<acc_t>(sum_s[j] / N), col_mean_t[begin + j] = static_cast<acc_t>(sum_t[j] / N);
    }
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < width; ++j) {
        const double cs = ps[n * K + begin + j] - col_mean_s[begin + j];
        const double ct = pt[n * K + begin + j] - col_mean_t[begin + j];
        dot[j] += cs * ct, sq_s[j] += cs * cs, sq_t[j] += ct * ct;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      const Pearson<acc_t> r = make_pearson<acc_t>(static_cast<acc_t>(dot[j]), static_cast<acc_t>(sq_s[j]),
                                                   static_cast<acc_t>(sq_t[j]), eps);
      col_rho[begin + j] = r.rho, col_inv_d[begin + j] = r.inv_d;
      col_self_s[begin + j] = r.self_s, col_self_t[begin + j] = r.self_t;
    }
  });
  double inter = 0, intra = 0;
  for (int64_t n = 0; n < N; ++n) inter += rows[4 * n];
  for (int64_t j = 0; j < K; ++j) intra += col_rho[j];
  const double tau2 = temperature * temperature;
  const double loss = tau2 * (inter_weight * (1.0 - inter / N) + intra_weight * (1.0 - intra / K));
  at::Tensor grad_s = forward_grad_or_empty(student, needs_s);
  at::Tensor grad_t = forward_grad_or_empty(teacher, needs_t);
  if (needs_s || needs_t) {
    // ∂loss/∂p[n, j] = −τ²·(β/N·∂ρ_n/∂p[n, j] + γ/K·∂ρ'_j/∂p[n, j]), then through the row's
    // softmax: ∂/∂z[n, k] = p[n, k]·(G[n, k] − Σ_j G[n, j]·p[n, j]) / τ.
    const acc_t row_w = static_cast<acc_t>(-tau2 * inter_weight / N), col_w = static_cast<acc_t>(-tau2 * intra_weight / K);
    acc_t* gs = needs_s ? grad_s.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gt = needs_t ? grad_t.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, N, rows_per_task(K), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> g(K);
      for (int64_t n = begin; n < end; ++n) {
        const acc_t* p_s = ps + n * K;
        const acc_t* p_t = pt + n * K;
        double sum_s = 0, sum_t = 0, unused = 0;
        sum3<acc_t>(0, K, [&](int64_t k, acc_t& x, acc_t& y, acc_t&) { x += p_s[k], y += p_t[k]; }, sum_s, sum_t,
                    unused);
        const acc_t mean_s = static_cast<acc_t>(sum_s / K), mean_t = static_cast<acc_t>(sum_t / K);
        const acc_t rho_inv_d = rows[4 * n + 1], rho_self_s = rows[4 * n + 2], rho_self_t = rows[4 * n + 3];
        for (int side = 0; side < 2; ++side) {
          acc_t* out = side == 0 ? gs : gt;
          if (out == nullptr) continue;
          const acc_t* p = side == 0 ? p_s : p_t;
          const acc_t* other = side == 0 ? p_t : p_s;
          const acc_t mean = side == 0 ? mean_s : mean_t, other_mean = side == 0 ? mean_t : mean_s;
          const acc_t self_row = side == 0 ? rho_self_s : rho_self_t;
          const std::vector<acc_t>& cm = side == 0 ? col_mean_s : col_mean_t;
          const std::vector<acc_t>& cm_other = side == 0 ? col_mean_t : col_mean_s;
          const std::vector<acc_t>& self_col = side == 0 ? col_self_s : col_self_t;
          // G[n, k] into g, and Σ_k G[n, k]·p[n, k] in the same sweep
          const acc_t weighted = static_cast<acc_t>(sum1<acc_t>(0, K, [&](int64_t k) {
            const acc_t d_row = rho_inv_d * (other[k] - other_mean) - self_row * (p[k] - mean);
            const acc_t d_col = col_inv_d[k] * (other[k] - cm_other[k]) - self_col[k] * (p[k] - cm[k]);
            g[k] = row_w * d_row + col_w * d_col;
            return g[k] * p[k];
          }));
          acc_t* o = out + n * K;
          AGKD_SIMD
          for (int64_t k = 0; k < K; ++k) o[k] = p[k] * (g[k] - weighted) * inv_tau;
        }
      }
    });
  }
  at::Tensor loss_t = at::empty({}, acc_options);
  loss_t.fill_(loss);
  return {loss_t, grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                            double temperature, double inter_weight,
                                                            double intra_weight, double eps,
                                                            bool needs_grad_student, bool needs_grad_teacher) {
  check_dist(student, teacher, temperature, inter_weight, intra_weight, eps);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "dist_fwd_cpu", [&] {
    out = dist_typed<scalar_t>(student, teacher, temperature, inter_weight, intra_weight,
                               static_cast<at::opmath_type<scalar_t>>(eps), needs_grad_student, needs_grad_teacher);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CPU, m) {
  register_kernel<op::KdFamilyFwd>(m, &kd_family_fwd_cpu);
  register_kernel<op::DkdFwd>(m, &dkd_fwd_cpu);
  register_kernel<op::OfaFwd>(m, &ofa_fwd_cpu);
  register_kernel<op::DistFwd>(m, &dist_fwd_cpu);
}

}  // namespace agkd
