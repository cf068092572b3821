// Host-side helpers every op shares: the accumulate dtype, gradient outputs, and the one
// way runtime loss weights become compile-time term flags.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>
#include <tuple>

namespace agkd {

// "(2, 3, 8, 8)": a tensor's shape for an error message. Host code that nvcc compiles
// streams no integers into TORCH_CHECK (docs/design.md, section 7): numbers go through
// std::to_string.
inline std::string shape_of(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + ")";
}

// float32 for half/bfloat16/float32, float64 for float64: the dtype that kernels
// accumulate in and that the per-sample outputs (loss, stats) carry.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous gradient for an input that needs one, an empty tensor (no work) otherwise.
inline at::Tensor input_grad_or_empty(const at::Tensor& like, bool needed) {
  return needed ? at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous))
                : at::empty({0}, like.options());
}

// The two outputs of every loss forward: (N,) per-sample loss and (N, n_stats) stats for
// the backward, in the accumulate dtype on `like`'s device.
inline std::tuple<at::Tensor, at::Tensor> per_sample_outputs(const at::Tensor& like, int64_t n,
                                                             int64_t n_stats) {
  const auto options = like.options().dtype(accumulate_dtype(like.scalar_type()));
  return {at::empty({n}, options), at::empty({n, n_stats}, options)};
}

// What a loss backward receives besides its inputs, as the forward produced it: `op`'s
// upstream gradient (N,) and saved stats (N, n_stats), in the accumulate dtype of `like`
// and on its device.
inline void check_backward_inputs(const char* op, const at::Tensor& grad_loss, const at::Tensor& stats,
                                  const at::Tensor& like, int64_t n, int64_t n_stats) {
  const auto acc = accumulate_dtype(like.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == n && grad_loss.scalar_type() == acc, op,
              ": grad_loss must be (N,) of the accumulate dtype, got ", shape_of(grad_loss));
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == n && stats.size(1) == n_stats && stats.scalar_type() == acc,
              op, ": stats must be (N, ", std::to_string(n_stats), ") of the accumulate dtype, got ",
              shape_of(stats));
  TORCH_CHECK(grad_loss.device() == like.device() && stats.device() == like.device(), op,
              ": grad_loss and stats must be on the inputs' device");
}

// How a loss forward reduces its per-sample values (the schemas' `reduction`).
enum class Reduction { kNone, kMean, kSum };

inline Reduction parse_reduction(c10::string_view name) {
  if (name == "none") return Reduction::kNone;
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(false, "agkd: reduction must be 'none', 'mean' or 'sum', got '", name, "'");
}

// A loss forward's `loss` output: the (N,) per-sample values, or their mean or sum as a
// 0-dim tensor, in the accumulate dtype. The reduction is ATen's own, so the numbers are
// those of per_sample.mean() / .sum() in Python, without the extra autograd node.
inline at::Tensor reduce_loss(const at::Tensor& per_sample, Reduction reduction) {
  switch (reduction) {
    case Reduction::kMean: return per_sample.mean();
    case Reduction::kSum: return per_sample.sum();
    default: return per_sample;
  }
}

// Calls body.template operator()<kFirst, kSecond>() with the flags equal to `first` and
// `second` (a loss term's weight != 0, or an output being needed), so each kernel is
// compiled without the work of a switched-off term. Callers where both may be off (hybrid
// and align: a zero loss) pass kAllowNone = true; elsewhere (kd, whose Python API never
// sets both weights to 0) the empty combination is not instantiated and asking for it is
// an error.
template <bool kAllowNone = false, typename Body>
void dispatch_terms(bool first, bool second, const Body& body) {
  if (first && second) {
    body.template operator()<true, true>();
  } else if (first) {
    body.template operator()<true, false>();
  } else if (second) {
    body.template operator()<false, true>();
  } else if constexpr (kAllowNone) {
    body.template operator()<false, false>();
  } else {
    TORCH_CHECK(false, "agkd: at least one loss term needs a non-zero weight");
  }
}

// Calls body.template operator()<kFlag>() with kFlag equal to `flag`.
template <typename Body>
void dispatch_flag(bool flag, const Body& body) {
  if (flag) {
    body.template operator()<true>();
  } else {
    body.template operator()<false>();
  }
}

}  // namespace agkd
