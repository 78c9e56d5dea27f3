// ATen side of the HEM loss shared by the CPU and CUDA entry points: argument checks (the same
// messages as the Python checks, for direct torch.ops callers).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "../common/argument_checks.h"
#include "../common/backward_checks.h"
#include "../common/compute_type.h"

namespace dpm_ops::hem {

// Returns whether the reduction is the mean.
inline bool check_inputs(const at::Tensor& cls_logits, double eps, const std::string& reduction) {
  TORCH_CHECK_VALUE(cls_logits.dim() == 3, "hem_loss: cls_logits must be 3-D (B, heads, N), got ",
                    cls_logits.dim(), "-D");
  // no token: no attention to diversify (it gave 0.67)
  TORCH_CHECK_VALUE(cls_logits.size(1) > 0 && cls_logits.size(2) > 0,
                    "hem_loss: cls_logits must have at least one head and one patch token, got shape ",
                    cls_logits.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(cls_logits.scalar_type()), "hem_loss: cls_logits must be floating point, got ",
                    cls_logits.scalar_type());
  const double least_eps = smallest_normal(cls_logits.scalar_type());
  TORCH_CHECK_VALUE(eps >= least_eps && std::isfinite(eps), "hem_loss: eps must be finite and >= ", least_eps,
                    ", the smallest normal ", compute_type(cls_logits.scalar_type()), " number, got ", eps);
  TORCH_CHECK_VALUE(reduction == "sum" || reduction == "mean",
                    "hem_loss: reduction must be 'sum' (official) or 'mean', got '", reduction, "'");
  if (reduction == "mean") check_batch("hem_loss", "cls_logits", cls_logits);  // the sum of none is 0
  return reduction == "mean";
}

// The reduction's weight per sample (a mean has a batch of one or more: check_inputs).
inline double sample_weight(int64_t batch, bool mean) { return mean ? 1.0 / double(batch) : 1.0; }

}  // namespace dpm_ops::hem
