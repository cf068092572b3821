// Every agkd op as a C++ type: the name of its schema (declared in ops.cpp) and the C++
// signature of that schema, written once here. Device kernels and autograd wrappers are
// registered through `register_kernel<Op>`, which does not compile when a kernel's
// signature differs from the op's; C++ callers (the autograd Functions) call an op through
// `op_handle<Op>()` (autograd/autograd.h), typed by the same signature. The dispatcher
// checks each signature against its schema string when the library loads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace agkd {
namespace op {

using at::Tensor;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

struct HybridFwd {
  static constexpr const char* kName = "hybrid_fwd";
  using Signature = Tensors2(const Tensor& x, const Tensor& y, double alpha, double beta, int64_t window_size,
                             double sigma, double c1, double c2, c10::string_view padding, double eps,
                             c10::string_view reduction);
};
struct HybridBwd {
  static constexpr const char* kName = "hybrid_bwd";
  using Signature = Tensors2(const Tensor& grad_loss, const Tensor& x, const Tensor& y, const Tensor& stats,
                             double alpha, double beta, int64_t window_size, double sigma, double c1, double c2,
                             c10::string_view padding, double eps, bool needs_grad_x, bool needs_grad_y);
};

struct KdFwd {
  static constexpr const char* kName = "kd_fwd";
  using Signature = Tensors4(const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& target,
                             double temperature, double ce_weight, double kl_weight, double label_smoothing,
                             std::optional<int64_t> ignore_index, c10::string_view reduction,
                             bool needs_grad_student, bool needs_grad_teacher);
};

struct KdFamilyFwd {
  static constexpr const char* kName = "kd_family_fwd";
  using Signature = Tensors4(const Tensor& student, const Tensor& teacher, const Tensor& temperature,
                             const std::optional<Tensor>& teacher_temperature, bool standardize,
                             double standardize_eps, c10::string_view reduction, bool needs_grad_student,
                             bool needs_grad_teacher, bool needs_grad_temperature);
};
struct DkdFwd {
  static constexpr const char* kName = "dkd_fwd";
  using Signature = Tensors3(const Tensor& student, const Tensor& teacher, const Tensor& target, double temperature,
                             double tckd_weight, double nckd_weight, c10::string_view reduction,
                             bool needs_grad_student, bool needs_grad_teacher);
};
struct OfaFwd {
  static constexpr const char* kName = "ofa_fwd";
  using Signature = Tensors3(const Tensor& student, const Tensor& teacher, const Tensor& target, double temperature,
                             double eps, c10::string_view reduction, bool needs_grad_student,
                             bool needs_grad_teacher);
};
struct DistFwd {
  static constexpr const char* kName = "dist_fwd";
  using Signature = Tensors3(const Tensor& student, const Tensor& teacher, double temperature, double inter_weight,
                             double intra_weight, double eps, bool needs_grad_student, bool needs_grad_teacher);
};

struct AttentionMapFwd {
  static constexpr const char* kName = "attention_map_fwd";
  using Signature = Tensors2(const Tensor& features, double p, bool normalize, double eps);
};
struct AttentionMapBwd {
  static constexpr const char* kName = "attention_map_bwd";
  using Signature = Tensor(const Tensor& grad_map, const Tensor& features, const Tensor& map, const Tensor& norm,
                           double p, bool normalize, double eps);
};
struct MinmaxScaleFwd {
  static constexpr const char* kName = "minmax_scale_fwd";
  using Signature = Tensors2(const Tensor& maps, double eps);
};
struct MinmaxScaleBwd {
  static constexpr const char* kName = "minmax_scale_bwd";
  using Signature = Tensor(const Tensor& grad_scaled, const Tensor& maps, const Tensor& range, double eps);
};

struct AlignFwd {
  static constexpr const char* kName = "align_fwd";
  using Signature = Tensors2(const Tensor& student, const Tensor& teacher, double alpha, double beta, double gamma,
                             int64_t window_size, double sigma, double c1, double c2, c10::string_view padding,
                             double eps, bool align_corners, c10::string_view reduction,
                             std::optional<double> minmax_eps);
};
struct AlignBwd {
  static constexpr const char* kName = "align_bwd";
  using Signature = Tensors2(const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
                             const Tensor& stats, double alpha, double beta, double gamma, int64_t window_size,
                             double sigma, double c1, double c2, c10::string_view padding, double eps,
                             bool align_corners, bool needs_grad_student, bool needs_grad_teacher,
                             std::optional<double> minmax_eps);
};

}  // namespace op

// `kernel` as `Op`'s implementation in a TORCH_LIBRARY_IMPL block (`library` is its `m`).
template <typename Op, typename Library>
void register_kernel(Library& library, typename Op::Signature* kernel) {
  library.impl(Op::kName, kernel);
}

}  // namespace agkd
