// The fused masked ArcFace cross-entropy written once for any device: GEMMs through ATen
// (MKL / cuBLAS) over row chunks, each chunk's (rows, K) products consumed by one fused row pass.
// Two (rows, K) buffers of ceil(B/2) rows: never more than one (B, K) matrix's worth.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <tuple>

#include "../common/argument_checks.h"
#include "../common/no_autocast.h"
#include "../masked_cosine/masked_cosine_driver.h"
#include "masked_arcface_math.h"

namespace dpm_ops::masked_arcface {

constexpr double kEps = 1e-12;  // F.normalize's eps, as masked_arcface_logits calls the masked cosine

struct Params {
  double scale, margin;
  bool easy_margin;
  double clamp_eps, plain_weight, masked_weight;
};

inline void check_inputs(const at::Tensor& features, const at::Tensor& mask, const at::Tensor& weight,
                         const at::Tensor& labels, const Params& p) {
  masked_cosine::check_inputs(features, mask, weight, kEps);
  TORCH_CHECK_VALUE(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
                    "masked_arcface_cross_entropy: features must be float32 or float64 (the loss runs in at least "
                    "fp32), got ", features.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0),
                    "masked_arcface_cross_entropy: labels must be 1-D of length B = ", features.size(0), ", got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.device() == features.device(),
                    "masked_arcface_cross_entropy: labels must be int64 on the features' device, got ",
                    labels.scalar_type(), " on ", labels.device());
  check_batch("masked_arcface_cross_entropy", "features", features);
  TORCH_CHECK_VALUE(weight.size(0) > 0, "masked_arcface_cross_entropy: weight must have at least one class");
  // scale <= 0 flips or flattens the logits; a negative branch weight rewards the loss
  check_coefficient("masked_arcface_cross_entropy", "scale", p.scale, /*positive=*/true);
  TORCH_CHECK_VALUE(std::isfinite(p.margin), "masked_arcface_cross_entropy: margin must be a finite number, got ",
                    p.margin);
  check_coefficient("masked_arcface_cross_entropy", "plain_weight", p.plain_weight);
  check_coefficient("masked_arcface_cross_entropy", "masked_weight", p.masked_weight);
  TORCH_CHECK_VALUE(p.clamp_eps >= 0 && p.clamp_eps < 1,
                    "masked_arcface_cross_entropy: clamp_eps must lie in [0, 1), got ", p.clamp_eps);
}

// Rows per chunk so that the two (rows, K) buffers together hold at most B·K elements.
inline int64_t rows_per_chunk(int64_t B) { return std::max<int64_t>(1, (B + 1) / 2); }

// out = a·b (first chunk: out may be uninitialised) or out += a·b.
inline void accumulate_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool first) {
  if (first) {
    at::mm_out(out, a, b);
  } else {
    out.addmm_(a, b);
  }
}

// The loss (0-dim) and, with `with_grad`, its gradients w.r.t. (features, mask, weight) for a unit
// upstream gradient (the loss is a scalar: autograd's backward only rescales them). Gradients are
// computed in the same pass, like a fused linear cross-entropy: per chunk of rows, the masked
// cosine's num and den² go into the two buffers, one row pass turns them into the rows' CE and, in
// place, into the backward coefficients g_num and h (masked_cosine_math.h), which four GEMMs consume;
// then the plain logits go into the first buffer, one row pass gives their CE and, in place, their
// gradient, which two GEMMs consume. 9 GEMMs in all (eager autograd: 10), no (B, K) matrix kept.
// Without `with_grad` the gradients are empty (0-element) tensors.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& features, const at::Tensor& mask,
                                                                   const at::Tensor& weight, const at::Tensor& labels,
                                                                   const Params& p, bool with_grad) {
  const NoAutocastGuard no_autocast;  // the GEMMs below stay in the features' dtype under autocast
  const int64_t B = features.size(0), K = weight.size(0);
  const bool with_plain = p.plain_weight != 0;
  const masked_cosine::Prepared prep =
      masked_cosine::prepare<Kernels>(features, mask, weight, kEps, Kernels::operand_type(features.scalar_type()));
  at::Tensor row_loss = at::empty({B}, features.options());
  at::Tensor grad_features, grad_mask, up, vp, grad_weight_plain;
  if (with_grad) {
    grad_features = at::empty_like(features);
    grad_mask = at::empty_like(mask);
    // Accumulators: the first chunk overwrites them (zeros only when there is no chunk at all).
    auto accumulator = [&] { return B == 0 ? at::zeros_like(weight) : at::empty_like(weight); };
    up = accumulator();
    vp = accumulator();
    if (with_plain) grad_weight_plain = accumulator();
  }
  const int64_t chunk = rows_per_chunk(B);
  at::Tensor first = at::empty({std::min(chunk, B), K}, features.options()), second = at::empty_like(first);
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    const bool first_chunk = r0 == 0;
    at::Tensor num = first.narrow(0, 0, n), den_sq = second.narrow(0, 0, n);
    const at::Tensor y = labels.narrow(0, r0, n);
    at::Tensor loss = row_loss.narrow(0, r0, n);
    at::mm_out(num, prep.query_scaled.narrow(0, r0, n), prep.proto_hat.t());
    at::mm_out(den_sq, prep.mask_sq.narrow(0, r0, n), prep.proto_hat_sq.t());
    Kernels::masked_rows(num, den_sq, y, p, B, with_grad, loss);  // num -> g_num, den_sq -> h
    at::Tensor u, v;
    if (with_grad) {
      u = at::mm(num, prep.proto_hat);
      v = at::mm(den_sq, prep.proto_hat_sq);
      accumulate_mm(up, num.t(), prep.query_scaled.narrow(0, r0, n), first_chunk);
      accumulate_mm(vp, den_sq.t(), prep.mask_sq.narrow(0, r0, n), first_chunk);
    }
    at::Tensor plain_grad_features;
    if (with_plain) {
      at::Tensor plain = first.narrow(0, 0, n);
      at::mm_out(plain, features.narrow(0, r0, n), weight.t());
      Kernels::plain_rows(plain, y, p, B, with_grad, loss);  // plain -> dLoss/dplain
      if (with_grad) {
        plain_grad_features = at::mm(plain, weight);
        accumulate_mm(grad_weight_plain, plain.t(), features.narrow(0, r0, n), first_chunk);
      }
    }
    if (with_grad) {
      at::Tensor gf = grad_features.narrow(0, r0, n), gm = grad_mask.narrow(0, r0, n);
      Kernels::query_rows_backward(features.narrow(0, r0, n), mask.narrow(0, r0, n),
                                   prep.query_inv.narrow(0, r0, n), u, v, plain_grad_features, gf, gm);
    }
  }
  at::Tensor loss = row_loss.sum().div_(static_cast<double>(B));
  if (!with_grad) {
    const at::Tensor none = at::empty({0}, features.options());
    return {loss, none, none.clone(), none.clone()};
  }
  at::Tensor grad_weight = at::empty_like(weight);
  Kernels::proto_rows_backward(weight, prep.proto_inv, up, vp, grad_weight_plain, grad_weight);
  return {loss, grad_features, grad_mask, grad_weight};
}

// The op on any device (the schema's arguments), with that device's Kernels.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_arcface_ce(
    const at::Tensor& features, const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& labels,
    double scale, double margin, bool easy_margin, double clamp_eps, double plain_weight, double masked_weight,
    bool with_grad) {
  const Params p{scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight};
  check_inputs(features, mask, weight, labels, p);
  const c10::OptionalDeviceGuard guard(at::device_of(features));
  Kernels::check_labels(labels, weight.size(0));
  return forward<Kernels>(features.contiguous(), mask.contiguous(), weight.contiguous(), labels.contiguous(), p,
                          with_grad);
}

}  // namespace dpm_ops::masked_arcface
