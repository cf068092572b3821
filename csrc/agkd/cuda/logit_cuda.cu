// CUDA kernels of the logit-KD family: agkd::kd_family_fwd, dkd_fwd, ofa_fwd, dist_fwd.
//
// As on the CPU (cpu/logit_cpu.cpp), each op returns its loss and the gradients of that
// loss in one call (logit.h says what they are, math/logit.h why). One block per row: its
// threads stride over the classes, every row quantity is a fixed-order block reduction
// (cuda/block_reduce.cuh; the sums that cancel in double, as in cuda/kd_cuda.cu), so the
// results are bitwise repeatable, and each class's gradient is written by the thread that
// owns it. Later sweeps of a row read it again (from L2 for any K that fits there).
//
// A class target outside [0, K) makes its row's loss and gradients NaN: the host does not
// read the targets, which would synchronise with the device. A tensor temperature
// outside the kernels' range does the same for its row (math/logit.h).
//
// DIST couples the rows through its class columns: a row kernel writes the probabilities
// and each row's Pearson terms, a column kernel (a thread per class, the rows in order) the
// columns', a one-block kernel the loss, and a last row kernel the gradients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "agkd/cuda/block_reduce.cuh"
#include "agkd/cuda/launch.cuh"
#include "agkd/cuda/rows.cuh"
#include "agkd/logit.h"
#include "agkd/math/logit.h"
#include "agkd/ops.h"

namespace agkd {
namespace {

// A row total in double from each thread's acc_t part (every thread of the block calls it).
template <typename T>
__device__ __forceinline__ double block_sum(T part, double* wide) {
  return block_reduce(static_cast<double>(part), wide, SumOp{});
}

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Row n's loss and both gradients (where asked for) set to NaN.
template <typename acc_t>
__device__ void nan_row(int64_t n, int64_t K, acc_t* loss, acc_t* grad_s, acc_t* grad_t) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (grad_s) grad_s[n * K + k] = quiet_nan<acc_t>();
    if (grad_t) grad_t[n * K + k] = quiet_nan<acc_t>();
  }
  if (threadIdx.x == 0) loss[n] = quiet_nan<acc_t>();
}

void check_rows(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.size(0) < (int64_t{1} << 31), op, " (CUDA): too many rows");
}

// ============================================================ agkd::kd_family_fwd

// (N, M) temperatures, read with their strides.
template <typename acc_t>
struct Temperatures {
  const acc_t* data;
  int64_t sN, sM, M;
  __device__ __forceinline__ acc_t at(int64_t n, int64_t m) const { return data[n * sN + m * sM]; }
};

template <typename acc_t>
Temperatures<acc_t> temperatures_of(const at::Tensor& t) {
  return {t.const_data_ptr<acc_t>(), t.stride(0), t.stride(1), t.size(1)};
}

template <typename scalar_t>
struct FamilyArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Logits<scalar_t> s, t;
  Temperatures<acc_t> tau, tau_t;
  int64_t K;
  acc_t standardize_eps;
  acc_t scale;                                // the reduction's factor of the gradients
  acc_t *loss, *grad_s, *grad_t, *grad_tau;  // grads null where not asked for
};

// A row as the KL terms read it: u = (z − mean)·inv, the z-score, or z itself (mean 0,
// inv 1, which leaves every value exact).
template <typename acc_t>
struct RowView {
  RowStandardization<acc_t> st{acc_t(0), acc_t(0), acc_t(1)};
  __device__ __forceinline__ acc_t operator()(acc_t z) const { return (z - st.mean) * st.inv; }
};

template <typename scalar_t>
__device__ RowView<at::opmath_type<scalar_t>> standardized_view(const Logits<scalar_t>& z, int64_t n, int64_t K,
                                                              at::opmath_type<scalar_t> eps, double* wide) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t part = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) part += z.at(n, k);
  const acc_t mean = static_cast<acc_t>(block_sum(part, wide) / static_cast<double>(K));
  acc_t square = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t d = z.at(n, k) - mean;
    square += d * d;
  }
  return {make_standardization<acc_t>(mean, static_cast<acc_t>(block_sum(square, wide)), K, eps)};
}

// ∂L/∂u of one side (in `grad`, this thread's classes) to the scaled ∂L/∂z, in place.
template <typename scalar_t, bool kStandardize>
__device__ void finish_side_grad(const Logits<scalar_t>& z, const RowView<at::opmath_type<scalar_t>>& view,
                                 int64_t n, int64_t K, at::opmath_type<scalar_t> scale,
                                 at::opmath_type<scalar_t>* grad, double* wide) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* g = grad + n * K;
  if (!kStandardize) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) g[k] *= scale;
    return;
  }
  acc_t g_part = 0, g_dot_u_part = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) g_part += g[k], g_dot_u_part += g[k] * view(z.at(n, k));
  const acc_t g_mean = static_cast<acc_t>(block_sum(g_part, wide) / static_cast<double>(K));
  const acc_t g_dot_u = static_cast<acc_t>(block_sum(g_dot_u_part, wide));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    g[k] = standardized_grad(g[k], view(z.at(n, k)), g_mean, g_dot_u, view.st, K) * scale;
  }
}

template <typename scalar_t, bool kTied, bool kStandardize>
__global__ void __launch_bounds__(kRowThreads) kd_family_kernel(const FamilyArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kRowThreads];
  __shared__ double wide[kRowThreads];
  const int64_t n = blockIdx.x, K = a.K, M = a.tau.M;
  RowView<acc_t> vs, vt;
  if (kStandardize) {
    vs = standardized_view(a.s, n, K, a.standardize_eps, wide);
    vt = standardized_view(a.t, n, K, a.standardize_eps, wide);
  }
  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    max_s = MaxOp{}(max_s, vs(a.s.at(n, k)));
    max_t = MaxOp{}(max_t, vt(a.t.at(n, k)));
  }
  max_s = block_reduce(max_s, scratch, MaxOp{});
  max_t = block_reduce(max_t, scratch, MaxOp{});

  const bool grads = a.grad_s || a.grad_t || a.grad_tau;  // the same for the whole block
  double loss = 0;
  for (int64_t m = 0; m < M; ++m) {
    acc_t tau = a.tau.at(n, m), tau_t = kTied ? tau : a.tau_t.at(n, m);
    if (!temperature_in_range(tau) || !temperature_in_range(tau_t)) tau = tau_t = quiet_nan<acc_t>();
    const acc_t inv_tau = acc_t(1) / tau, inv_tau_t = acc_t(1) / tau_t;
    const auto b_of = [&](int64_t k) { return (vs(a.s.at(n, k)) - max_s) * inv_tau; };
    const auto a_of = [&](int64_t k) { return (vt(a.t.at(n, k)) - max_t) * inv_tau_t; };
    acc_t z_s = 0, z_t = 0, w = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const acc_t b = b_of(k), at = a_of(k), ea = DeviceExp{}(at);
      z_s += DeviceExp{}(b), z_t += ea, w += kl_term(ea, at, b);
    }
    const double total_z_s = block_sum(z_s, wide), total_z_t = block_sum(z_t, wide);
    const KlTerm<double> term_d = make_kl_term(total_z_s, total_z_t, block_sum(w, wide));
    loss += static_cast<double>(tau) * tau * term_d.kl;
    if (!grads) continue;
    const KlTerm<acc_t> term{static_cast<acc_t>(term_d.log_z_s), static_cast<acc_t>(term_d.log_z_t),
                             static_cast<acc_t>(term_d.kl)};
    acc_t share = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const KlGrads<acc_t> g = kl_term_grads(term, b_of(k), a_of(k), tau, tau_t, kTied, DeviceExp{});
      if (a.grad_s) a.grad_s[n * K + k] = (m == 0 ? acc_t(0) : a.grad_s[n * K + k]) + g.student;
      if (a.grad_t) a.grad_t[n * K + k] = (m == 0 ? acc_t(0) : a.grad_t[n * K + k]) + g.teacher;
      share += g.tau_share;
    }
    if (a.grad_tau) {
      const acc_t total_share = static_cast<acc_t>(block_sum(share, wide));
      if (threadIdx.x == 0) a.grad_tau[n * M + m] = (acc_t(2) * tau * term.kl + total_share) * a.scale;
    }
  }
  if (threadIdx.x == 0) a.loss[n] = static_cast<acc_t>(loss);
  if (a.grad_s) finish_side_grad<scalar_t, kStandardize>(a.s, vs, n, K, a.scale, a.grad_s, wide);
  if (a.grad_t) finish_side_grad<scalar_t, kStandardize>(a.t, vt, n, K, a.scale, a.grad_t, wide);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_family_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const std::optional<at::Tensor>& teacher_temperature, bool standardize, double standardize_eps,
    c10::string_view reduction, bool needs_grad_student, bool needs_grad_teacher, bool needs_grad_temperature) {
  const c10::cuda::CUDAGuard guard(student.device());
  KdFamilyCall call = prepare_kd_family(student, teacher, temperature, teacher_temperature, standardize,
                                        standardize_eps, reduction, needs_grad_student, needs_grad_teacher,
                                        needs_grad_temperature);
  check_rows("agkd::kd_family_fwd", student);
  const Reduction r = call.out.reduction;
  const int64_t N = call.out.N, K = call.out.K;
  at::Tensor &loss = call.out.loss, &grad_s = call.out.grad_s, &grad_t = call.out.grad_t;
  const bool tied = call.tied;
  at::Tensor& grad_tau = call.grad_tau;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kd_family_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FamilyArgs<scalar_t> args{logits_of<scalar_t>(student),
                                    logits_of<scalar_t>(teacher),
                                    temperatures_of<acc_t>(temperature),
                                    temperatures_of<acc_t>(tied ? temperature : *teacher_temperature),
                                    K,
                                    static_cast<acc_t>(standardize_eps),
                                    static_cast<acc_t>(output_grad_scale(r, N)),
                                    loss.mutable_data_ptr<acc_t>(),
                                    needs_grad_student ? grad_s.mutable_data_ptr<acc_t>() : nullptr,
                                    needs_grad_teacher ? grad_t.mutable_data_ptr<acc_t>() : nullptr,
                                    needs_grad_temperature ? grad_tau.mutable_data_ptr<acc_t>() : nullptr};
    dispatch_flag(tied, [&]<bool kTied>() {
      dispatch_flag(standardize, [&]<bool kStandardize>() {
        launch_kernel(kd_family_kernel<scalar_t, kTied, kStandardize>, N, row_threads(K), 0, stream, args);
      });
    });
  });
  return {reduce_loss(loss, r), grad_s, grad_t, grad_tau};
}

// ============================================================ agkd::dkd_fwd

template <typename scalar_t>
struct TargetArgs {  // DKD's and OFA's: two logit rows and a class per row
  using acc_t = at::opmath_type<scalar_t>;
  Logits<scalar_t> s, t;
  const int64_t* classes;
  int64_t K;
  acc_t tau, scale;
  acc_t *loss, *grad_s, *grad_t;
};

template <typename scalar_t>
TargetArgs<scalar_t> target_args(const at::Tensor& student, const at::Tensor& teacher, TargetLossCall& call,
                                 double temperature) {
  using acc_t = at::opmath_type<scalar_t>;
  RowLossOutputs& out = call.out;
  return {logits_of<scalar_t>(student),
          logits_of<scalar_t>(teacher),
          call.classes.const_data_ptr<int64_t>(),
          out.K,
          static_cast<acc_t>(temperature),
          static_cast<acc_t>(output_grad_scale(out.reduction, out.N)),
          out.loss.mutable_data_ptr<acc_t>(),
          out.grad_s.numel() ? out.grad_s.mutable_data_ptr<acc_t>() : nullptr,
          out.grad_t.numel() ? out.grad_t.mutable_data_ptr<acc_t>() : nullptr};
}

// With b = (s − m_s)/τ and a = (t − m_t)/τ shifted by the non-target maxima (math/logit.h,
// DkdSide): the non-target normalisers and NCKD's Σ_{k≠y} e^{a_k}(a_k − b_k), then the row
// (make_dkd_row) and, per class, dkd_grads_at times τ·scale.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    dkd_kernel(const TargetArgs<scalar_t> a, at::opmath_type<scalar_t> tckd_weight,
               at::opmath_type<scalar_t> nckd_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kRowThreads];
  __shared__ double wide[kRowThreads];
  const int64_t n = blockIdx.x, K = a.K, y = a.classes[n];
  if (!(y >= 0 && y < K)) return nan_row(n, K, a.loss, a.grad_s, a.grad_t);  // the same for the whole block
  const acc_t inv_tau = acc_t(1) / a.tau;
  acc_t shift_s = -std::numeric_limits<acc_t>::infinity(), shift_t = shift_s;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (k == y) continue;
    shift_s = MaxOp{}(shift_s, a.s.at(n, k));
    shift_t = MaxOp{}(shift_t, a.t.at(n, k));
  }
  shift_s = block_reduce(shift_s, scratch, MaxOp{});
  shift_t = block_reduce(shift_t, scratch, MaxOp{});
  const auto b_of = [&](int64_t k) { return (a.s.at(n, k) - shift_s) * inv_tau; };
  const auto a_of = [&](int64_t k) { return (a.t.at(n, k) - shift_t) * inv_tau; };
  acc_t z_s = 0, z_t = 0, w = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    if (k == y) continue;
    const acc_t b = b_of(k), at = a_of(k), ea = DeviceExp{}(at);
    z_s += DeviceExp{}(b), z_t += ea, w += kl_term(ea, at, b);
  }
  const acc_t z_other_s = static_cast<acc_t>(block_sum(z_s, wide));
  const acc_t z_other_t = static_cast<acc_t>(block_sum(z_t, wide));
  const acc_t nckd_w = static_cast<acc_t>(block_sum(w, wide));
  const DkdSide<acc_t> ss = make_dkd_side<acc_t>(shift_s, z_other_s, b_of(y));
  const DkdSide<acc_t> ts = make_dkd_side<acc_t>(shift_t, z_other_t, a_of(y));
  const DkdRow<acc_t> row = make_dkd_row(ss, ts, nckd_w, z_other_t, DeviceExp{});
  if (threadIdx.x == 0) a.loss[n] = a.tau * a.tau * (tckd_weight * row.tckd + nckd_weight * row.nckd);
  if (!a.grad_s && !a.grad_t) return;
  const acc_t grad_factor = a.tau * a.scale;  // τ²·(1/τ)
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const DkdGrads<acc_t> g =
        dkd_grads_at(k == y, b_of(k), a_of(k), ss, ts, row, tckd_weight, nckd_weight, DeviceExp{});
    if (a.grad_s) a.grad_s[n * K + k] = grad_factor * g.student;
    if (a.grad_t) a.grad_t[n * K + k] = grad_factor * g.teacher;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                            const at::Tensor& target, double temperature,
                                                            double tckd_weight, double nckd_weight,
                                                            c10::string_view reduction, bool needs_grad_student,
                                                            bool needs_grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  TargetLossCall call = prepare_dkd(student, teacher, target, temperature, tckd_weight, nckd_weight, reduction,
                                    needs_grad_student, needs_grad_teacher);
  check_rows("agkd::dkd_fwd", student);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "dkd_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(dkd_kernel<scalar_t>, call.out.N, row_threads(call.out.K), 0, stream,
                  target_args<scalar_t>(student, teacher, call, temperature), static_cast<acc_t>(tckd_weight),
                  static_cast<acc_t>(nckd_weight));
  });
  return {reduce_loss(call.out.loss, call.out.reduction), call.out.grad_s, call.out.grad_t};
}

// ============================================================ agkd::ofa_fwd

// OFA's weight of class k and its teacher factor e_k = −(∂w_k/∂log p_t,k)·log p_s,k
// (math/logit.h, ofa_weight), with 0·log 0 = 0.
template <typename acc_t>
struct OfaClass {
  acc_t log_p_s, log_p_t, weight, teacher_e;
};

template <typename acc_t>
__device__ __forceinline__ OfaClass<acc_t> ofa_class(bool is_target, acc_t log_p_s, acc_t log_p_t, acc_t eps) {
  const OfaWeight<acc_t> w = ofa_weight(is_target, log_p_t, eps, DeviceExp{});
  return {log_p_s, log_p_t, w.weight, w.teacher_factor == acc_t(0) ? acc_t(0) : -w.teacher_factor * log_p_s};
}

// Per row, with p = softmax(·/τ): loss = −Σ w_k log p_s,k; ∂/∂s_j = (W·p_s,j − w_j)/τ with
// W = Σ w_k; ∂/∂t_j = (e_j − p_t,j·E)/τ with E = Σ e_k.
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    ofa_kernel(const TargetArgs<scalar_t> a, at::opmath_type<scalar_t> eps) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kRowThreads];
  __shared__ double wide[kRowThreads];
  const int64_t n = blockIdx.x, K = a.K, y = a.classes[n];
  if (!(y >= 0 && y < K)) return nan_row(n, K, a.loss, a.grad_s, a.grad_t);  // the same for the whole block
  const acc_t inv_tau = acc_t(1) / a.tau;
  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    max_s = MaxOp{}(max_s, a.s.at(n, k));
    max_t = MaxOp{}(max_t, a.t.at(n, k));
  }
  max_s = block_reduce(max_s, scratch, MaxOp{});
  max_t = block_reduce(max_t, scratch, MaxOp{});
  acc_t z_s = 0, z_t = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    z_s += DeviceExp{}((a.s.at(n, k) - max_s) * inv_tau);
    z_t += DeviceExp{}((a.t.at(n, k) - max_t) * inv_tau);
  }
  const acc_t log_z_s = static_cast<acc_t>(log(block_sum(z_s, wide)));
  const acc_t log_z_t = static_cast<acc_t>(log(block_sum(z_t, wide)));
  const auto class_at = [&](int64_t k) {
    return ofa_class<acc_t>(k == y, (a.s.at(n, k) - max_s) * inv_tau - log_z_s,
                            (a.t.at(n, k) - max_t) * inv_tau - log_z_t, eps);
  };
  acc_t loss = 0, weight_sum = 0, e_sum = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const OfaClass<acc_t> c = class_at(k);
    loss -= c.weight == acc_t(0) ? acc_t(0) : c.weight * c.log_p_s;
    weight_sum += c.weight, e_sum += c.teacher_e;
  }
  const acc_t row_loss = static_cast<acc_t>(block_sum(loss, wide));
  if (threadIdx.x == 0) a.loss[n] = row_loss;
  if (!a.grad_s && !a.grad_t) return;
  const acc_t W = static_cast<acc_t>(block_sum(weight_sum, wide)), E = static_cast<acc_t>(block_sum(e_sum, wide));
  const acc_t grad_factor = a.scale * inv_tau;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const OfaClass<acc_t> c = class_at(k);
    if (a.grad_s) a.grad_s[n * K + k] = grad_factor * (W * DeviceExp{}(c.log_p_s) - c.weight);
    if (a.grad_t) a.grad_t[n * K + k] = grad_factor * (c.teacher_e - DeviceExp{}(c.log_p_t) * E);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ofa_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                            const at::Tensor& target, double temperature,
                                                            double eps, c10::string_view reduction,
                                                            bool needs_grad_student, bool needs_grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  TargetLossCall call = prepare_ofa(student, teacher, target, temperature, eps, reduction, needs_grad_student,
                                    needs_grad_teacher);
  check_rows("agkd::ofa_fwd", student);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "ofa_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_kernel(ofa_kernel<scalar_t>, call.out.N, row_threads(call.out.K), 0, stream,
                  target_args<scalar_t>(student, teacher, call, temperature), static_cast<acc_t>(eps));
  });
  return {reduce_loss(call.out.loss, call.out.reduction), call.out.grad_s, call.out.grad_t};
}

// ============================================================ agkd::dist_fwd

// The work buffers of one DIST call, acc_t: the probabilities (N, K) of each side, the
// rows' Pearson terms (N, 4: ρ, 1/D, self_s, self_t) and the columns' (6, K: mean_s,
// mean_t, ρ, 1/D, self_s, self_t).
template <typename acc_t>
struct DistBuffers {
  acc_t *p_s, *p_t, *rows, *cols;
  int64_t N, K;
  __device__ __forceinline__ acc_t* col(int which) const { return cols + which * K; }
};

enum DistColumn : int { kColMeanS = 0, kColMeanT, kColRho, kColInvD, kColSelfS, kColSelfT };

// p = softmax(z/τ) of row n into p[n, :], this thread's classes.
template <typename scalar_t>
__device__ void dist_softmax(const Logits<scalar_t>& z, int64_t n, int64_t K, at::opmath_type<scalar_t> inv_tau,
                             at::opmath_type<scalar_t>* p, at::opmath_type<scalar_t>* scratch, double* wide) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) max = MaxOp{}(max, z.at(n, k));
  max = block_reduce(max, scratch, MaxOp{});
  acc_t part = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    p[n * K + k] = DeviceExp{}((z.at(n, k) - max) * inv_tau);
    part += p[n * K + k];
  }
  const acc_t inv_total = static_cast<acc_t>(1.0 / block_sum(part, wide));
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) p[n * K + k] *= inv_total;
}

// Each row's centred sums, in this thread's classes.
template <typename acc_t>
__device__ void row_means(const DistBuffers<acc_t>& b, int64_t n, double* wide, acc_t& mean_s, acc_t& mean_t) {
  acc_t sum_s = 0, sum_t = 0;
  for (int64_t k = threadIdx.x; k < b.K; k += blockDim.x) sum_s += b.p_s[n * b.K + k], sum_t += b.p_t[n * b.K + k];
  mean_s = static_cast<acc_t>(block_sum(sum_s, wide) / static_cast<double>(b.K));
  mean_t = static_cast<acc_t>(block_sum(sum_t, wide) / static_cast<double>(b.K));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads)
    dist_rows_kernel(Logits<scalar_t> s, Logits<scalar_t> t, at::opmath_type<scalar_t> inv_tau,
                     at::opmath_type<scalar_t> eps, DistBuffers<at::opmath_type<scalar_t>> b) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kRowThreads];
  __shared__ double wide[kRowThreads];
  const int64_t n = blockIdx.x, K = b.K;
  dist_softmax(s, n, K, inv_tau, b.p_s, scratch, wide);
  dist_softmax(t, n, K, inv_tau, b.p_t, scratch, wide);
  acc_t mean_s, mean_t;
  row_means(b, n, wide, mean_s, mean_t);
  acc_t dot = 0, sq_s = 0, sq_t = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const acc_t cs = b.p_s[n * K + k] - mean_s, ct = b.p_t[n * K + k] - mean_t;
    dot += cs * ct, sq_s += cs * cs, sq_t += ct * ct;
  }
  const acc_t total_dot = static_cast<acc_t>(block_sum(dot, wide));
  const acc_t total_s = static_cast<acc_t>(block_sum(sq_s, wide)), total_t = static_cast<acc_t>(block_sum(sq_t, wide));
  if (threadIdx.x == 0) {
    const Pearson<acc_t> r = make_pearson<acc_t>(total_dot, total_s, total_t, eps);
    acc_t* out = b.rows + 4 * n;
    out[0] = r.rho, out[1] = r.inv_d, out[2] = r.self_s, out[3] = r.self_t;
  }
}

// One thread per class column, the rows summed in order (coalesced: neighbouring threads
// read neighbouring classes of the same row).
template <typename acc_t>
__global__ void dist_columns_kernel(DistBuffers<acc_t> b, acc_t eps) {
  AGKD_GRID_STRIDE(j, b.K) {
    double sum_s = 0, sum_t = 0;
    for (int64_t n = 0; n < b.N; ++n) sum_s += b.p_s[n * b.K + j], sum_t += b.p_t[n * b.K + j];
    const acc_t mean_s = static_cast<acc_t>(sum_s / b.N), mean_t = static_cast<acc_t>(sum_t / b.N);
    double dot = 0, sq_s = 0, sq_t = 0;
    for (int64_t n = 0; n < b.N; ++n) {
      const double cs = b.p_s[n * b.K + j] - mean_s, ct = b.p_t[n * b.K + j] - mean_t;
      dot += cs * ct, sq_s += cs * cs, sq_t += ct * ct;
    }
    const Pearson<acc_t> r = make_pearson<acc_t>(static_cast<acc_t>(dot), static_cast<acc_t>(sq_s),
                                                 static_cast<acc_t>(sq_t), eps);
    b.col(kColMeanS)[j] = mean_s, b.col(kColMeanT)[j] = mean_t, b.col(kColRho)[j] = r.rho;
    b.col(kColInvD)[j] = r.inv_d, b.col(kColSelfS)[j] = r.self_s, b.col(kColSelfT)[j] = r.self_t;
  }
}

// τ²·(β·(1 − mean row ρ) + γ·(1 − mean column ρ)), one block.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    dist_loss_kernel(DistBuffers<acc_t> b, double tau, double inter_weight, double intra_weight, acc_t* loss) {
  __shared__ double wide[kRowThreads];
  double rows = 0, cols = 0;
  for (int64_t n = threadIdx.x; n < b.N; n += blockDim.x) rows += b.rows[4 * n];
  for (int64_t j = threadIdx.x; j < b.K; j += blockDim.x) cols += b.col(kColRho)[j];
  const double inter = block_reduce(rows, wide, SumOp{}), intra = block_reduce(cols, wide, SumOp{});
  if (threadIdx.x == 0) {
    *loss = static_cast<acc_t>(tau * tau *
                               (inter_weight * (1.0 - inter / b.N) + intra_weight * (1.0 - intra / b.K)));
  }
}

// ∂loss/∂p[n, j] = −τ²·(β/N·∂ρ_n/∂p[n, j] + γ/K·∂ρ'_j/∂p[n, j]), then through the row's
// softmax: ∂/∂z[n, k] = p[n, k]·(G[n, k] − Σ_j G[n, j]·p[n, j]) / τ.
template <typename acc_t>
__global__ void __launch_bounds__(kRowThreads)
    dist_grads_kernel(DistBuffers<acc_t> b, acc_t row_w, acc_t col_w, acc_t inv_tau, acc_t* grad_s,
                      acc_t* grad_t) {
  __shared__ double wide[kRowThreads];
  const int64_t n = blockIdx.x, K = b.K;
  acc_t mean_s, mean_t;
  row_means(b, n, wide, mean_s, mean_t);
  const acc_t* row = b.rows + 4 * n;
  for (int side = 0; side < 2; ++side) {  // the same for the whole block
    acc_t* out = side == 0 ? grad_s : grad_t;
    if (out == nullptr) continue;
    const acc_t* p = (side == 0 ? b.p_s : b.p_t) + n * K;
    const acc_t* other = (side == 0 ? b.p_t : b.p_s) + n * K;
    const acc_t mean = side == 0 ? mean_s : mean_t, other_mean = side == 0 ? mean_t : mean_s;
    const acc_t self_row = row[side == 0 ? 2 : 3];
    const acc_t* col_mean = b.col(side == 0 ? kColMeanS : kColMeanT);
    const acc_t* col_mean_other = b.col(side == 0 ? kColMeanT : kColMeanS);
    const acc_t* self_col = b.col(side == 0 ? kColSelfS : kColSelfT);
    const acc_t* col_inv_d = b.col(kColInvD);
    const auto g_at = [&](int64_t k) {
      const acc_t d_row = row[1] * (other[k] - other_mean) - self_row * (p[k] - mean);
      const acc_t d_col = col_inv_d[k] * (other[k] - col_mean_other[k]) - self_col[k] * (p[k] - col_mean[k]);
      return row_w * d_row + col_w * d_col;
    };
    acc_t part = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) part += g_at(k) * p[k];
    const acc_t weighted = static_cast<acc_t>(block_sum(part, wide));
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) out[n * K + k] = p[k] * (g_at(k) - weighted) * inv_tau;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                             double temperature, double inter_weight,
                                                             double intra_weight, double eps,
                                                             bool needs_grad_student, bool needs_grad_teacher) {
  check_dist(student, teacher, temperature, inter_weight, intra_weight, eps);
  check_rows("agkd::dist_fwd", student);
  const int64_t N = student.size(0), K = student.size(1);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc_options = student.options().dtype(accumulate_dtype(student.scalar_type()));
  at::Tensor probabilities = at::empty({2, N, K}, acc_options);
  at::Tensor row_terms = at::empty({N, 4}, acc_options), col_terms = at::empty({6, K}, acc_options);
  at::Tensor loss = at::empty({}, acc_options);
  at::Tensor grad_s = forward_grad_or_empty(student, needs_grad_student);
  at::Tensor grad_t = forward_grad_or_empty(teacher, needs_grad_teacher);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "dist_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* p = probabilities.mutable_data_ptr<acc_t>();
    const DistBuffers<acc_t> b{p, p + N * K, row_terms.mutable_data_ptr<acc_t>(), col_terms.mutable_data_ptr<acc_t>(),
                               N, K};
    const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature), eps_acc = static_cast<acc_t>(eps);
    launch_kernel(dist_rows_kernel<scalar_t>, N, row_threads(K), 0, stream, logits_of<scalar_t>(student),
                  logits_of<scalar_t>(teacher), inv_tau, eps_acc, b);
    launch_kernel(dist_columns_kernel<acc_t>, flat_blocks(K), kFlatThreads, 0, stream, b, eps_acc);
    launch_kernel(dist_loss_kernel<acc_t>, 1, kRowThreads, 0, stream, b, temperature, inter_weight, intra_weight,
                  loss.mutable_data_ptr<acc_t>());
    if (needs_grad_student || needs_grad_teacher) {
      const double tau2 = temperature * temperature;
      launch_kernel(dist_grads_kernel<acc_t>, N, row_threads(K), 0, stream, b,
                    static_cast<acc_t>(-tau2 * inter_weight / N), static_cast<acc_t>(-tau2 * intra_weight / K),
                    inv_tau, needs_grad_student ? grad_s.mutable_data_ptr<acc_t>() : nullptr,
                    needs_grad_teacher ? grad_t.mutable_data_ptr<acc_t>() : nullptr);
    }
  });
  return {loss, grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(agkd, CUDA, m) {
  register_kernel<op::KdFamilyFwd>(m, &kd_family_fwd_cuda);
  register_kernel<op::DkdFwd>(m, &dkd_fwd_cuda);
  register_kernel<op::OfaFwd>(m, &ofa_fwd_cuda);
  register_kernel<op::DistFwd>(m, &dist_fwd_cuda);
}

}  // namespace agkd
