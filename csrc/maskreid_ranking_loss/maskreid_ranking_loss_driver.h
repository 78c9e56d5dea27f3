// ATen side of the ranking loss shared by the CPU and CUDA entry points: argument checks (the same
// messages as the Python checks, for direct torch.ops callers) and the similarity GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <string>

#include "../common/argument_checks.h"
#include "../common/backward_checks.h"
#include "../common/compute_type.h"
#include "../common/no_autocast.h"
#include "maskreid_ranking_loss_math.h"

namespace dpm_ops::maskreid_ranking {

inline Options<double> parse_options(double alpha, double lam, const std::string& neg_mode,
                                     const std::string& pos_mode) {
  TORCH_CHECK_VALUE(neg_mode == "literal" || neg_mode == "violating_only",
                    "maskreid_ranking_loss: neg_mode must be 'literal' or 'violating_only', got '", neg_mode, "'");
  TORCH_CHECK_VALUE(pos_mode != "all",
                    "maskreid_ranking_loss: pos_mode 'all' was renamed 'all_eq5' (Eq. 5's margin, hinge and pull "
                    "over every positive); the paper's Eq. 4 is 'eq4'");
  TORCH_CHECK_VALUE(pos_mode == "hardest" || pos_mode == "all_eq5" || pos_mode == "eq4",
                    "maskreid_ranking_loss: pos_mode must be 'hardest', 'all_eq5' or 'eq4', got '", pos_mode, "'");
  TORCH_CHECK_VALUE(pos_mode != "eq4" || neg_mode == "literal",
                    "maskreid_ranking_loss: neg_mode does not apply to pos_mode 'eq4' (no margin, no hinge): leave it "
                    "'literal', got '", neg_mode, "'");
  TORCH_CHECK_VALUE(std::isfinite(alpha), "maskreid_ranking_loss: alpha must be finite, got ", alpha);
  check_coefficient("maskreid_ranking_loss", "lam", lam);  // a negative pull pushes positives apart
  const PosMode mode = pos_mode == "hardest" ? PosMode::kHardest
                       : pos_mode == "all_eq5" ? PosMode::kAllEq5 : PosMode::kEq4;
  return Options<double>{alpha, lam, neg_mode == "violating_only", mode};
}

inline void check_inputs(const at::Tensor& embeddings, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(embeddings.dim() == 2, "maskreid_ranking_loss: embeddings must be 2-D (B, D), got ",
                    embeddings.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(embeddings.scalar_type()),
                    "maskreid_ranking_loss: embeddings must be floating point, got ", embeddings.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == embeddings.size(0),
                    "maskreid_ranking_loss: labels must be 1-D with B = ", embeddings.size(0),
                    " entries, got shape ", labels.sizes());
  TORCH_CHECK_VALUE(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()),
                    "maskreid_ranking_loss: labels must be integer, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == embeddings.device(),
                    "maskreid_ranking_loss: embeddings and labels must be on one device, got ",
                    embeddings.device(), ", ", labels.device());
  check_batch("maskreid_ranking_loss", "embeddings", embeddings);
}

// dL/dX = grad · coef X (coef = G + Gᵀ from the forward), in the embeddings' dtype. The same ATen
// code for every device (the backward op's kernel on each): one GEMM and a scale.
inline at::Tensor backward(const at::Tensor& grad, const at::Tensor& embeddings, const at::Tensor& coef) {
  const NoAutocastGuard no_autocast;
  const c10::OptionalDeviceGuard guard(at::device_of(embeddings));
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == embeddings.size(0) && coef.size(1) == embeddings.size(0),
                    "maskreid_ranking_loss_backward: coef must be (B, B) for B = ", embeddings.size(0),
                    " embeddings, got ", coef.sizes());
  check_loss_grad("maskreid_ranking_loss_backward", grad);
  const at::Tensor x = embeddings.to(coef.scalar_type());
  return at::mm(coef, x).mul_(grad.to(coef.scalar_type())).to(embeddings.scalar_type());
}

}  // namespace dpm_ops::maskreid_ranking
