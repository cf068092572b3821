// Host-side helpers every op shares: the accumulate dtype, gradient outputs, and the one
// way runtime loss weights become compile-time term flags.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace agkd {

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
