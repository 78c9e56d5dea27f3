// ATen side of the HEM loss shared by the CPU and CUDA entry points: argument checks (the same
// messages as the Python checks, for direct torch.ops callers).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "../common/backward_checks.h"
#include "../common/compute_type.h"

namespace dpm_ops::hem {

// Returns whether the reduction is the mean.
inline bool check_inputs(const at::Tensor& cls_logits, double eps, const std::string& reduction) {
  TORCH_CHECK_VALUE(cls_logits.dim() == 3, "hem_loss: cls_logits must be 3-D (B, heads, N), got ",
                    cls_logits.dim(), "-D");
  TORCH_CHECK_VALUE(cls_logits.size(1) > 0, "hem_loss: cls_logits must have at least one head, got shape ",
                    cls_logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(cls_logits.scalar_type()), "hem_loss: cls_logits must be floating point, got ",
                    cls_logits.scalar_type());
  const double least_eps = smallest_normal(cls_logits.scalar_type());
  TORCH_CHECK_VALUE(eps >= least_eps && std::isfinite(eps), "hem_loss: eps must be finite and >= ", least_eps,
                    ", the smallest normal ", compute_type(cls_logits.scalar_type()), " number, got ", eps);
  TORCH_CHECK_VALUE(reduction == "sum" || reduction == "mean",
                    "hem_loss: reduction must be 'sum' (official) or 'mean', got '", reduction, "'");
  return reduction == "mean";
}

// The reduction's weight per sample; the mean of no sample is NaN, like torch's.
inline double sample_weight(int64_t batch, bool mean) {
  if (!mean) return 1.0;
  return batch > 0 ? 1.0 / double(batch) : std::nan("");
}

}  // namespace dpm_ops::hem
