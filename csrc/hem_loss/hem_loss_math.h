// Per-sample maths of DPM's HEM loss (head enrichment: the heads' CLS attention kept orthonormal), shared by the CPU
// and CUDA kernels. For one sample's CLS->patch logits A (heads × N):
//
//   R = A Aᵀ (raw Gram),  r_h = 1 / sqrt(R_hh + eps),  G_hi = r_h r_i R_hi  (= Â Âᵀ, Â = r ⊙ A),
//   L = Σ_hi (G_hi − δ_hi)² / heads²
//
// so one pass over A gives both the norms (R's diagonal) and the Gram. Backward, with w the
// upstream gradient times the reduction's weight (1, or 1/B for "mean") and c = 4w / heads²:
//   dL/dÂ = c (G − I) Â,   dL/dA_hj = r_h (dÂ_hj − Â_hj d_h),   d_h = Σ_j Â_hj dÂ_hj = c ((G − I) G)_hh.
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace dpm_ops::hem {

template <typename A> DPM_HD A inv_row_norm(A sum_sq, A eps) { return A(1) / square_root(sum_sq + eps); }

template <typename A> DPM_HD A residual(A g, int64_t h, int64_t i) { return h == i ? g - A(1) : g; }

// Normalises the raw Gram in place (heads × heads, row-major) and writes r; walks entries
// start, start + step, ... (the CUDA kernel's threads; the CPU walks all). The caller makes
// `inv` complete before the second loop when several threads share it.
template <typename A> DPM_HD void inv_norms_from_gram(const A* gram, int64_t heads, A eps, A* inv, int64_t start,
                                                      int64_t step) {
  for (int64_t h = start; h < heads; h += step) inv[h] = inv_row_norm(gram[h * heads + h], eps);
}
template <typename A> DPM_HD void normalise_gram(A* gram, const A* inv, int64_t heads, int64_t start, int64_t step) {
  for (int64_t e = start; e < heads * heads; e += step) gram[e] *= inv[e / heads] * inv[e % heads];
}

// One sample's loss from its normalised Gram.
template <typename A> DPM_HD A sample_loss(const A* gram, int64_t heads) {
  A total = A(0);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < heads; ++i) {
      const A d = residual(gram[h * heads + i], h, i);
      total += d * d;
    }
  return total / A(heads * heads);
}

template <typename A> DPM_HD A grad_scale(A weight, int64_t heads) { return A(4) * weight / A(heads * heads); }

// d_h = c ((G − I) G)_hh.
template <typename A> DPM_HD A row_projection(const A* gram, int64_t heads, int64_t h, A c) {
  A total = A(0);
  for (int64_t i = 0; i < heads; ++i) total += residual(gram[h * heads + i], h, i) * gram[i * heads + h];
  return c * total;
}

// The coefficient of A_ij in dÂ_hj = Σ_i c (G_hi − δ_hi) r_i A_ij.
template <typename A> DPM_HD A mix_coef(const A* gram, const A* inv, int64_t heads, int64_t h, int64_t i, A c) {
  return c * residual(gram[h * heads + i], h, i) * inv[i];
}

template <typename A> DPM_HD A grad_logit(A inv_h, A a_hj, A grad_hat_hj, A d_h) {
  return inv_h * (grad_hat_hj - inv_h * a_hj * d_h);
}

}  // namespace dpm_ops::hem
