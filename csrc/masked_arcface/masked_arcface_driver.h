// The fused masked ArcFace cross-entropy written once for any device: GEMMs through ATen
// (MKL / cuBLAS) over row chunks, each chunk's (rows, K) products consumed by one fused row pass.
// The chunks are sized so that all (·, K) buffers together never exceed one (B, K) matrix; the
// backward recomputes the products instead of keeping any (B, K) matrix from the forward.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "../masked_cosine/masked_cosine_driver.h"
#include "masked_arcface_math.h"

namespace dpm_ops {
namespace masked_arcface {

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
  TORCH_CHECK_VALUE(weight.size(0) > 0, "masked_arcface_cross_entropy: weight must have at least one class");
  TORCH_CHECK_VALUE(p.clamp_eps >= 0 && p.clamp_eps < 1, "masked_arcface_cross_entropy: clamp_eps must lie in [0, 1), got ",
                    p.clamp_eps);
}

// Rows per chunk so that `buffers` (rows, K) matrices hold at most B·K elements (at least 1 row).
inline int64_t rows_per_chunk(int64_t B, int buffers) { return std::max<int64_t>(1, (B + buffers - 1) / buffers); }

struct ChunkBuffers {
  at::Tensor num, den_sq, plain;  // (rows, K); plain undefined without the plain branch
};

inline ChunkBuffers chunk_products(const masked_cosine::Prepared& prep, const at::Tensor& features,
                                   const at::Tensor& weight, bool with_plain, int64_t r0, int64_t n,
                                   ChunkBuffers& storage) {
  ChunkBuffers c{storage.num.narrow(0, 0, n), storage.den_sq.narrow(0, 0, n),
                 with_plain ? storage.plain.narrow(0, 0, n) : at::Tensor()};
  at::mm_out(c.num, prep.query_scaled.narrow(0, r0, n), prep.proto_hat.t());
  at::mm_out(c.den_sq, prep.mask_sq.narrow(0, r0, n), prep.proto_hat_sq.t());
  if (with_plain) at::mm_out(c.plain, features.narrow(0, r0, n), weight.t());
  return c;
}

inline ChunkBuffers allocate_chunk(const at::Tensor& features, int64_t rows, int64_t K, bool with_plain) {
  const auto opts = features.options();
  return {at::empty({rows, K}, opts), at::empty({rows, K}, opts),
          with_plain ? at::empty({rows, K}, opts) : at::Tensor()};
}

// Returns (loss (0-dim), masked row lse (B), plain row lse (B; zeros without the plain branch)).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& features, const at::Tensor& mask,
                                                       const at::Tensor& weight, const at::Tensor& labels,
                                                       const Params& p) {
  const int64_t B = features.size(0), K = weight.size(0);
  const bool with_plain = p.plain_weight != 0;
  const masked_cosine::Prepared prep = masked_cosine::prepare<Kernels>(features, mask, weight, kEps);
  at::Tensor masked_lse = at::empty({B}, features.options()), plain_lse = at::zeros({B}, features.options());
  at::Tensor row_loss = at::empty({B}, features.options());
  const int64_t chunk = rows_per_chunk(B, with_plain ? 3 : 2);
  ChunkBuffers storage = allocate_chunk(features, std::min(chunk, B), K, with_plain);
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    const ChunkBuffers c = chunk_products(prep, features, weight, with_plain, r0, n, storage);
    Kernels::forward_rows(c.num, c.den_sq, c.plain, labels.narrow(0, r0, n), p, masked_lse.narrow(0, r0, n),
                          plain_lse.narrow(0, r0, n), row_loss.narrow(0, r0, n));
  }
  return {row_loss.sum().div_(static_cast<double>(B)), masked_lse, plain_lse};
}

// Gradients w.r.t. (features, mask, weight) of grad · loss.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& features,
                                                        const at::Tensor& mask, const at::Tensor& weight,
                                                        const at::Tensor& labels, const at::Tensor& masked_lse,
                                                        const at::Tensor& plain_lse, const Params& p) {
  const int64_t B = features.size(0), K = weight.size(0);
  const bool with_plain = p.plain_weight != 0;
  const masked_cosine::Prepared prep = masked_cosine::prepare<Kernels>(features, mask, weight, kEps);
  at::Tensor grad_features = at::empty_like(features), grad_mask = at::empty_like(mask);
  at::Tensor up = at::zeros_like(weight), vp = at::zeros_like(weight);
  at::Tensor grad_weight_plain = with_plain ? at::zeros_like(weight) : at::Tensor();
  const int64_t chunk = rows_per_chunk(B, with_plain ? 3 : 2);
  ChunkBuffers storage = allocate_chunk(features, std::min(chunk, B), K, with_plain);
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t n = std::min(chunk, B - r0);
    const ChunkBuffers c = chunk_products(prep, features, weight, with_plain, r0, n, storage);
    // In place: num -> g_num, den_sq -> h (masked_cosine's coefficients), plain -> its logit gradient.
    Kernels::backward_rows(grad, c.num, c.den_sq, c.plain, labels.narrow(0, r0, n), masked_lse.narrow(0, r0, n),
                           plain_lse.narrow(0, r0, n), p, B);
    const at::Tensor u = at::mm(c.num, prep.proto_hat), v = at::mm(c.den_sq, prep.proto_hat_sq);
    up.addmm_(c.num.t(), prep.query_scaled.narrow(0, r0, n));
    vp.addmm_(c.den_sq.t(), prep.mask_sq.narrow(0, r0, n));
    at::Tensor plain_grad_features;
    if (with_plain) {
      plain_grad_features = at::mm(c.plain, weight);
      grad_weight_plain.addmm_(c.plain.t(), features.narrow(0, r0, n));
    }
    at::Tensor gf = grad_features.narrow(0, r0, n), gm = grad_mask.narrow(0, r0, n);
    Kernels::query_rows_backward(features.narrow(0, r0, n), mask.narrow(0, r0, n), prep.query_inv.narrow(0, r0, n),
                                 u, v, plain_grad_features, gf, gm);
  }
  at::Tensor grad_weight = at::empty_like(weight);
  Kernels::proto_rows_backward(weight, prep.proto_inv, up, vp, grad_weight_plain, grad_weight);
  return {grad_features, grad_mask, grad_weight};
}

}  // namespace masked_arcface
}  // namespace dpm_ops
