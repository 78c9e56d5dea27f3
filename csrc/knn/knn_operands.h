// ATen-side preparation shared by the CPU and CUDA entry points of the fused distance + top-k:
// argument checks, the metric, and the operands in the compute type.
#pragma once

#include <ATen/ATen.h>

#include "knn_math.h"

namespace dpm_ops {
namespace knn {

constexpr int64_t kTieMargin = 4;  // self_knn with row-max normalisation: extra candidates

inline Metric parse_metric(c10::string_view name) {
  if (name == "euclidean") return Metric::kEuclidean;
  if (name == "sqeuclidean") return Metric::kSqEuclidean;
  if (name == "cosine") return Metric::kCosine;
  TORCH_CHECK_VALUE(false, "knn: metric must be one of euclidean, sqeuclidean, cosine, got ", name);
}

inline void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "knn: ", name, " must be 2-D (rows, features), got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), "knn: ", name, " must be floating point, got ",
                    t.scalar_type());
}

inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Rows in the compute type (unit rows for cosine, with F.normalize's eps) and their squared norms.
struct Operand {
  at::Tensor rows, norms;
  Operand(const at::Tensor& v, Metric metric, at::ScalarType type) {
    rows = v.detach().to(type).contiguous();  // the op's autograd is registered apart
    if (metric == Metric::kCosine) rows = (rows / rows.norm(2, {1}, true).clamp_min(1e-12)).contiguous();
    norms = (rows * rows).sum(1).contiguous();
  }
};

}  // namespace knn
}  // namespace dpm_ops
