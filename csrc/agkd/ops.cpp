// Every agkd operator schema, declared once (their C++ signatures: ops.h). Kernels register
// per device in cpu/ and cuda/, autograd (C++, at the Autograd key) per op in autograd/,
// and the fake (meta) implementations from Python in agkd_ops/_registrations.py.
#include <Python.h>
#include <torch/library.h>

#include "agkd/math/hybrid.h"  // kHybridStats
#include "agkd/math/kd.h"      // kKdStats
#include "agkd/math/logit.h"   // kMinTemperature, kMaxTemperature

// The extension module's name: _C, or _C_cuda_emu for the build that runs the CUDA
// kernels on the CPU emulator (setup.py, AGKD_CUDA_EMULATION).
#ifndef AGKD_EXTENSION_NAME
#define AGKD_EXTENSION_NAME _C
#endif
#define AGKD_CONCAT_(a, b) a##b
#define AGKD_CONCAT(a, b) AGKD_CONCAT_(a, b)
#define AGKD_STRINGIFY_(a) #a
#define AGKD_STRINGIFY(a) AGKD_STRINGIFY_(a)

// Importing agkd_ops._C runs the static TORCH_LIBRARY registrations below; the module
// itself carries build facts for agkd_ops.build_info() and the numbers Python must not copy.
PyMODINIT_FUNC AGKD_CONCAT(PyInit_, AGKD_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                                          AGKD_STRINGIFY(AGKD_EXTENSION_NAME), nullptr, -1,
                                          nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef AGKD_CUDA_EMULATION
  PyModule_AddIntConstant(m, "cuda_emulation", 1);
#else
  PyModule_AddIntConstant(m, "cuda_emulation", 0);
#endif
#ifdef AGKD_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  // The stats widths the fake kernels (agkd_ops/_registrations.py) need, from their owner.
  PyModule_AddIntConstant(m, "hybrid_stats", agkd::kHybridStats);
  PyModule_AddIntConstant(m, "kd_stats", agkd::kKdStats);
  // The kernels' own temperature bounds, which tests hold equal to agkd_ops's.
  PyModule_AddObject(m, "min_temperature", PyFloat_FromDouble(agkd::kMinTemperature));
  PyModule_AddObject(m, "max_temperature", PyFloat_FromDouble(agkd::kMaxTemperature));
  PyModule_AddStringConstant(m, "cuda_archs", AGKD_CUDA_ARCHS);
  PyModule_AddStringConstant(m, "torch_version", AGKD_TORCH_VERSION);
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "openmp", 1);
#else
  PyModule_AddIntConstant(m, "openmp", 0);
#endif
  return m;
}

TORCH_LIBRARY(agkd, m) {
  // Fused SSIM + cosine. Per sample n:
  //   loss[n] = alpha * (1 - mean SSIM map) + beta * (1 - cos(flatten x_n, flatten y_n))
  // stats[n] = (x·y, |x|², |y|²), what the backward needs for the cosine term.
  // Both outputs are float32 (float64 for float64 inputs). `reduction` ("none", "mean",
  // "sum") makes loss (N,) or 0-dim, as in every loss forward below; the backward takes
  // the per-sample gradient (N,) whatever the reduction was.
  m.def(
      "hybrid_fwd(Tensor x, Tensor y, float alpha, float beta, int window_size, float sigma, "
      "float c1, float c2, str padding, float eps, str reduction) -> (Tensor loss, Tensor stats)");
  // Gradients of sum_n grad_loss[n] * loss[n] for x and y in one pass; an input whose
  // gradient is not needed gets an empty tensor and costs nothing.
  m.def(
      "hybrid_bwd(Tensor grad_loss, Tensor x, Tensor y, Tensor stats, float alpha, float beta, "
      "int window_size, float sigma, float c1, float c2, str padding, float eps, "
      "bool needs_grad_x, bool needs_grad_y) -> (Tensor grad_x, Tensor grad_y)");

  // Temperature-scaled KL and Hinton KD loss of (N, K) logits. Per row n:
  //   loss[n] = ce_weight * CE(student[n], target[n]) + kl_weight * T² * KL(p_t ‖ p_s)
  // with p = softmax(logits / T) and CE at temperature 1, as F.cross_entropy with
  // label_smoothing. target: (N,) int64 class indices or (N, K) probabilities in the
  // logits' dtype; unused (may be None) when ce_weight == 0 and there is no ignore_index.
  // A row whose class is ignore_index has loss 0 and gradient 0 and is left out of the
  // "mean". stats[n] holds the row maxima, log-normalisers, KL and the CE target's mass
  // (math/kd.h, KdStat). With needs_grad_student / needs_grad_teacher the same pass also
  // returns the gradient of the loss output (of each row's loss, for "none") with respect
  // to that input, (N, K) in the accumulate dtype; otherwise an empty tensor. The autograd
  // backward scales these by the upstream gradient: no kernel runs in it.
  m.def(
      "kd_fwd(Tensor student, Tensor teacher, Tensor? target, float temperature, "
      "float ce_weight, float kl_weight, float label_smoothing, int? ignore_index, "
      "str reduction, bool needs_grad_student=False, bool needs_grad_teacher=False) -> "
      "(Tensor loss, Tensor stats, Tensor grad_student, Tensor grad_teacher)");

  // The logit-KD family (math/logit.h). Each returns the loss (reduced as `reduction`
  // says) and, where asked for, the gradient of that output with respect to each input,
  // computed in the same pass (logit.h); an input whose gradient is not asked for gets an
  // empty tensor. Gradients are in the accumulate dtype.
  //
  // Σ_m τ_m²·KL(softmax(t̃/τ_t[n, m]) ‖ softmax(s̃/τ[n, m])) per row, with s̃, t̃ the rows
  // z-scored when `standardize` (σ with Bessel's correction, plus standardize_eps);
  // temperature (N, M) (any strides; a row's temperatures
  // outside [1e-3, 1e3] make its loss NaN), teacher_temperature the same shape or None
  // (the teacher at the student's temperature, which then also gets that gradient).
  m.def(
      "kd_family_fwd(Tensor student, Tensor teacher, Tensor temperature, Tensor? teacher_temperature, "
      "bool standardize, float standardize_eps, str reduction, bool needs_grad_student, "
      "bool needs_grad_teacher, bool needs_grad_temperature) -> (Tensor loss, Tensor grad_student, "
      "Tensor grad_teacher, Tensor grad_temperature)");
  // Decoupled KD per row: T²·(tckd_weight·KL(b_t ‖ b_s) + nckd_weight·KL(q_t ‖ q_s)),
  // target (N,) int64 class indices.
  m.def(
      "dkd_fwd(Tensor student, Tensor teacher, Tensor target, float temperature, float tckd_weight, "
      "float nckd_weight, str reduction, bool needs_grad_student, bool needs_grad_teacher) -> "
      "(Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  // OFA per row: −Σ_k ((p_t,k + [k = y])^eps − [k = y])·log p_s,k at temperature T.
  m.def(
      "ofa_fwd(Tensor student, Tensor teacher, Tensor target, float temperature, float eps, "
      "str reduction, bool needs_grad_student, bool needs_grad_teacher) -> "
      "(Tensor loss, Tensor grad_student, Tensor grad_teacher)");
  // DIST: T²·(inter_weight·(1 − mean row Pearson) + intra_weight·(1 − mean column
  // Pearson)) of the softmax probabilities at T, with eps added to each Pearson
  // denominator; a 0-dim loss.
  m.def(
      "dist_fwd(Tensor student, Tensor teacher, float temperature, float inter_weight, "
      "float intra_weight, float eps, bool needs_grad_student, bool needs_grad_teacher) -> "
      "(Tensor loss, Tensor grad_student, Tensor grad_teacher)");

  // Attention transfer map of (N, C, H, W) features: map (N, 1, H, W) = mean_c |F|^p,
  // divided by max(‖·‖₂, eps) per sample when normalize; norm (N,) is ‖mean_c |F|^p‖₂
  // (accumulate dtype), what the backward needs besides the map.
  m.def("attention_map_fwd(Tensor features, float p, bool normalize, float eps) -> (Tensor map, Tensor norm)");
  // Min–max scaling of every (sample, channel) map of (N, C, H, W) maps (any strides):
  // scaled = (m − min) / (max − min), and 0 (with a zero gradient) for a map whose range
  // is at most eps (math/attention.h). scaled is contiguous, in the maps' dtype; range
  // (N, C, 2) holds each map's min and max in the accumulate dtype, what the backward needs.
  m.def("minmax_scale_fwd(Tensor maps, float eps) -> (Tensor scaled, Tensor range)");
  m.def("minmax_scale_bwd(Tensor grad_scaled, Tensor maps, Tensor range, float eps) -> Tensor grad_maps");
  m.def(
      "attention_map_bwd(Tensor grad_map, Tensor features, Tensor map, Tensor norm, float p, "
      "bool normalize, float eps) -> Tensor grad_features");

  // Attention alignment: the student (N, C, h, w) resized bilinearly to the teacher's
  // (H, W) on the fly (as F.interpolate(align_corners=...)), then per sample
  //   loss[n] = alpha * (1 - SSIM) + beta * (1 - cos) + gamma * mean((up(s) - t)²)
  // with stats (N, 3) the cosine sums as in hybrid_fwd. With minmax_eps, every map of both
  // inputs is min–max scaled first (as by minmax_scale_fwd with that eps; the student's at
  // its own size), inside the same kernels.
  m.def(
      "align_fwd(Tensor student, Tensor teacher, float alpha, float beta, float gamma, "
      "int window_size, float sigma, float c1, float c2, str padding, float eps, "
      "bool align_corners, str reduction, float? minmax_eps=None) -> (Tensor loss, Tensor stats)");
  m.def(
      "align_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, float alpha, "
      "float beta, float gamma, int window_size, float sigma, float c1, float c2, str padding, "
      "float eps, bool align_corners, bool needs_grad_student, bool needs_grad_teacher, "
      "float? minmax_eps=None) -> (Tensor grad_student, Tensor grad_teacher)");
}
