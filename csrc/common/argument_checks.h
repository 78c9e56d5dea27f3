// Argument checks the loss ops share, with the messages of their Python twins' checks (dpm_ops/ops/_checks.py):
// a direct torch.ops call of the C++ op or of its Triton twin gets the same ValueErrors.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace dpm_ops {

constexpr double kMaxCoefficient = 1e6;  // MAX_COEFFICIENT: loss weights, logit scales, margins' multipliers

// A loss is a mean over the batch: an empty one has no value (a NaN, or a 0 for a sum of none).
inline void check_batch(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(0) > 0, op, ": ", name, " must hold at least one sample (B >= 1), got shape ", t.sizes());
}

// A finite coefficient in [0, kMaxCoefficient], or (0, kMaxCoefficient] when `positive`.
inline void check_coefficient(const char* op, const char* name, double value, bool positive = false) {
  const bool low_ok = positive ? value > 0 : value >= 0;
  TORCH_CHECK_VALUE(std::isfinite(value) && low_ok && value <= kMaxCoefficient, op, ": ", name,
                    " must be a finite number in ", positive ? "(" : "[", "0, ", kMaxCoefficient, "], got ", value);
}

}  // namespace dpm_ops
