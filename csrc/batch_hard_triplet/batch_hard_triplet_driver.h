// The fused batch-hard soft-margin triplet written once for any device: one Gram GEMM (ATen), one
// mining pass per anchor row (distances, hardest positive / negative, softplus), and, when autograd
// needs it, the gradient in the same call (the loss is a scalar: the backward only rescales it):
// each anchor's two mined pairs give closed-form contributions to four feature rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <tuple>

#include "../common/argument_checks.h"
#include "../common/no_autocast.h"
#include "batch_hard_triplet_math.h"

namespace dpm_ops::batch_hard_triplet {

inline void check_inputs(const at::Tensor& features, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(features.dim() == 2, "batch_hard_triplet: features must be 2-D (B, C), got ", features.dim(),
                    "-D");
  TORCH_CHECK_VALUE(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
                    "batch_hard_triplet: features must be float32 or float64, got ", features.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0),
                    "batch_hard_triplet: labels must be 1-D of length B = ", features.size(0), ", got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.device() == features.device(),
                    "batch_hard_triplet: labels must be int64 on the features' device");
  check_batch("batch_hard_triplet", "features", features);
}

// Per anchor: the mined pairs and their distances (ap, an), and whether each pair is live.
struct Mined {
  at::Tensor pos_index, neg_index;  // int64 (B); neg_index -1 without a negative
  at::Tensor pos_dist, neg_dist;    // (B)
  at::Tensor live;                  // uint8 (B, 2): pair (i, pos) / (i, neg) has d2 >= 1e-12
  at::Tensor row_loss;              // (B) softplus(ap − an)
};

// Returns (loss (0-dim), grad (B, C) for a unit upstream gradient, or an empty tensor).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& features, const at::Tensor& labels, bool with_grad) {
  const NoAutocastGuard no_autocast;  // the Gram GEMM stays in the features' dtype under autocast
  const int64_t B = features.size(0);
  const auto opts = features.options();
  const at::Tensor gram = at::mm(features, features.t());
  const at::Tensor sq = (features * features).sum(1);  // as the reference rounds it
  Mined m{at::empty({B}, labels.options()), at::empty({B}, labels.options()), at::empty({B}, opts),
          at::empty({B}, opts), at::empty({B, 2}, labels.options().dtype(at::kByte)), at::empty({B}, opts)};
  Kernels::mine(sq, gram, labels, m);
  at::Tensor loss = m.row_loss.sum().div_(static_cast<double>(B));
  if (!with_grad) return {loss, at::empty({0}, opts)};
  at::Tensor grad = at::empty_like(features);
  Kernels::gradient(features, m, B, grad);
  return {loss, grad};
}

// The op on any device (the schema's arguments), with that device's Kernels.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> batch_hard_triplet_op(const at::Tensor& features, const at::Tensor& labels,
                                                         bool with_grad) {
  check_inputs(features, labels);
  const c10::OptionalDeviceGuard guard(at::device_of(features));
  return forward<Kernels>(features.contiguous(), labels.contiguous(), with_grad);
}

}  // namespace dpm_ops::batch_hard_triplet
