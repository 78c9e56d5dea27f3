// Per-element maths of the masked prototype cosine, shared by the CPU and CUDA kernels.
//
//   C[b,k] = num / max(den, eps),  num = sum_c xh_bc m_bc ph_kc,  den^2 = sum_c m_bc^2 ph_kc^2
//
// with xh = x / max(||x||, eps) and ph = p / max(||p||, eps) (F.normalize semantics).
#pragma once

#include "../common/host_device.h"

namespace dpm_ops::masked_cosine {

// 1 / max(sqrt(sum_sq), eps): the row scale of F.normalize.
template <typename A> DPM_HD A inv_norm(A sum_sq, A eps) {
  return A(1) / max_of(square_root(sum_sq), eps);
}

template <typename A> DPM_HD A cosine(A num, A den_sq, A eps) {
  return num / max_of(square_root(den_sq), eps);
}

// Backward coefficients of one output element C = num / max(den, eps), upstream gradient g:
//   g_num = g / max(den, eps)          (dC/dnum)
//   h     = g * C / den^2 if den > eps, else 0 (the clamp is constant there)
// so that, with Xh, Ph the normalised rows and M the mask,
//   grad_xh = m * (G_num @ Ph),   grad_m = xh * (G_num @ Ph) - m * (H @ Ph^2),
//   grad_ph = G_num^T @ (Xh*M) - ph * (H^T @ M^2).
// Taking C (the forward output, unrounded) instead of num lets the backward skip one GEMM.
template <typename A> struct BackwardCoef {
  A g_num;
  A h;
};

template <typename A> DPM_HD BackwardCoef<A> backward_coef(A g, A c, A den_sq, A eps) {
  const A den = square_root(den_sq);
  BackwardCoef<A> r;
  if (den > eps) {
    r.g_num = g / den;
    r.h = g * c / den_sq;
  } else {
    r.g_num = g / eps;
    r.h = A(0);
  }
  return r;
}

// Gradient through v_hat = v / max(||v||, eps) for one element:
//   ||v|| > eps: (g - v_hat * <v_hat, g>) / ||v||   else: g / eps
// `inv` is 1/max(||v||,eps), `clamped` says whether the eps branch was taken.
template <typename A> DPM_HD A normalize_backward(A g, A v_hat, A dot_vhat_g, A inv, bool clamped) {
  return clamped ? g * inv : (g - v_hat * dot_vhat_g) * inv;
}


// Gradients w.r.t. the normalised query row element xh and the mask element m,
// given u = (G_num @ Ph)[b,c] and v = (H @ Ph^2)[b,c].
template <typename A> DPM_HD A grad_query_hat(A m, A u) { return m * u; }
template <typename A> DPM_HD A grad_mask_value(A xh, A m, A u, A v) { return xh * u - m * v; }

// Gradient w.r.t. the normalised prototype element ph, given
// up = (G_num^T @ (Xh*M))[k,c] and vp = (H^T @ M^2)[k,c].
template <typename A> DPM_HD A grad_proto_hat(A ph, A up, A vp) { return up - ph * vp; }

}  // namespace dpm_ops::masked_cosine
