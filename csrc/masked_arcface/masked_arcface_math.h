// Per-element / per-row maths of the fused masked ArcFace cross-entropy (DPM's prototype classifier loss), shared by
// the CPU and CUDA kernels. The cosine itself (and its backward) is masked_cosine_math.h's.
//
//   cos[b,k]  masked prototype cosine;  y = labels[b]
//   target:   sin = sqrt(1 - clamp(cos, -1+ce, 1-ce)^2),  phi = cos·cos m − sin·sin m
//             phi := cos > th ? phi : cos − mm   (th = cos(π−m), mm = sin(π−m)·m;
//                                                  easy_margin: cos > 0 ? phi : cos)
//   logits    l[b,k] = s·(k == y ? phi : cos)
//   loss      plain_w · mean_b CE(f Wᵀ) + masked_w · mean_b CE(l),   CE = lse_k(l) − l[y]
//
// exactly as dpm_ops/losses/arcface.py (the clamp only inside the sqrt; the raw cos elsewhere).
#pragma once

#include <cmath>

#include "../common/host_device.h"
#include "../masked_cosine/masked_cosine_math.h"

namespace dpm_ops::masked_arcface {

// The margin's constants, computed in double on the host and rounded to the accumulation type,
// as the reference's Python floats are when they meet an fp32 tensor.
template <typename A> struct Margin {
  A scale, cos_m, sin_m, th, mm, lo, hi;
  bool easy;
};

template <typename A> Margin<A> make_margin(double scale, double margin, bool easy, double clamp_eps) {
  const double pi = 3.14159265358979323846;
  return {A(scale), A(std::cos(margin)), A(std::sin(margin)), A(std::cos(pi - margin)),
          A(std::sin(pi - margin) * margin), A(-1.0 + clamp_eps), A(1.0 - clamp_eps), easy};
}

// phi(cos) and dphi/dcos for the target logit (torch.clamp passes the gradient on its bounds).
template <typename A> struct Phi {
  A value, slope;
};

template <typename A> DPM_HD Phi<A> target_phi(A c, const Margin<A>& m) {
  const bool inside = c >= m.lo && c <= m.hi;
  const A cc = inside ? c : (c < m.lo ? m.lo : m.hi);
  const A sine = square_root(A(1) - cc * cc);
  const A phi = c * m.cos_m - sine * m.sin_m;
  // d(-sin·sin m)/dc = sin m · c / sin; at sin = 0 (cos = ±1, clamp_eps = 0) taken as 0, as the
  // reference's sqrt_flat_at_zero (an infinite slope would make every gradient NaN).
  const A dphi = m.cos_m + (inside && sine > A(0) ? m.sin_m * c / sine : A(0));
  const bool keep = m.easy ? c > A(0) : c > m.th;
  if (keep) return {phi, dphi};
  return {m.easy ? c : c - m.mm, A(1)};
}

template <typename A> DPM_HD A arc_logit(A c, bool is_target, const Margin<A>& m) {
  return m.scale * (is_target ? target_phi(c, m).value : c);
}

// dLoss/dcos of one element, from the logit's softmax probability p and the upstream factor g
// (= grad · masked_w / B): s · g · (p − [k == y]) · (k == y ? dphi/dcos : 1).
template <typename A> DPM_HD A grad_cosine(A c, bool is_target, A p, A g, const Margin<A>& m) {
  const A dl = g * (is_target ? p - A(1) : p);
  return m.scale * dl * (is_target ? target_phi(c, m).slope : A(1));
}

// dLoss/dplain_logit: g · (p − [k == y]), g = grad · plain_w / B.
template <typename A> DPM_HD A grad_plain(A p, bool is_target, A g) { return g * (is_target ? p - A(1) : p); }

DPM_HD float exp_of(float v) { return expf(v); }
DPM_HD double exp_of(double v) { return ::exp(v); }
DPM_HD float log_of(float v) { return logf(v); }
DPM_HD double log_of(double v) { return ::log(v); }

// Running log-sum-exp: (max, sum of exp(v − max)); mergeable for parallel reductions.
template <typename A> struct Lse {
  A max, sum;
};

template <typename A> DPM_HD Lse<A> lse_empty() { return {-A(INFINITY), A(0)}; }

template <typename A> DPM_HD Lse<A> lse_merge(Lse<A> a, Lse<A> b) {
  if (b.max == -A(INFINITY)) return a;
  if (a.max == -A(INFINITY)) return b;
  const Lse<A> hi = a.max >= b.max ? a : b, lo = a.max >= b.max ? b : a;
  return {hi.max, hi.sum + lo.sum * exp_of(lo.max - hi.max)};  // one exp per merge
}

template <typename A> DPM_HD Lse<A> lse_add(Lse<A> a, A v) { return lse_merge(a, Lse<A>{v, A(1)}); }

template <typename A> DPM_HD A lse_value(Lse<A> a) { return a.max + log_of(a.sum); }

}  // namespace dpm_ops::masked_arcface
