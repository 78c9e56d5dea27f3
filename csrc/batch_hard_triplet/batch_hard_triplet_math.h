// Per-element maths of the fused batch-hard soft-margin triplet loss (one of DPM's training losses), shared by the CPU
// and CUDA kernels; transcribes dpm_ops/losses/triplet.py:
//   d2[i,j] = ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j,  d[i,j] = sqrt(max(d2, 1e-12))
//   ap_i = max_{j: y_j = y_i} d[i,j] (the anchor itself included),  an_i = min_{j: y_j != y_i} d[i,j] (inf if none)
//   loss = mean_i softplus(ap_i − an_i)   (F.softplus: beta 1, threshold 20)
// Ties pick the first index, as torch.max / torch.min along a dim (which receives the gradient).
#pragma once

#include <cmath>

#include "../common/host_device.h"

namespace dpm_ops::batch_hard_triplet {

constexpr double kMinSquared = 1e-12;  // the clamp of the squared distance

template <typename A> DPM_HD A squared_distance(A sq_i, A sq_j, A dot) { return sq_i + sq_j - A(2) * dot; }

template <typename A> DPM_HD A distance(A d2) { return square_root(max_of(d2, A(kMinSquared))); }

// clamp_min passes the gradient where d2 >= min.
template <typename A> DPM_HD bool distance_is_live(A d2) { return d2 >= A(kMinSquared); }

// Mining updates: strictly greater / smaller, so the first extreme index wins.
template <typename A> DPM_HD bool harder_positive(A d, A best) { return d > best; }
template <typename A> DPM_HD bool harder_negative(A d, A best) { return d < best; }

DPM_HD float exp_of(float v) { return expf(v); }
DPM_HD double exp_of(double v) { return ::exp(v); }
DPM_HD float log1p_of(float v) { return log1pf(v); }
DPM_HD double log1p_of(double v) { return ::log1p(v); }

// F.softplus(v) (threshold 20: linear above) and its derivative as torch's softplus_backward.
template <typename A> DPM_HD A softplus(A v) { return v > A(20) ? v : log1p_of(exp_of(v)); }
template <typename A> DPM_HD A softplus_slope(A v) {
  if (v > A(20)) return A(1);
  const A z = exp_of(v);
  return z / (z + A(1));
}

// d d[i,j] / d x_i = (x_i − x_j) / d for a live pair (0 otherwise); x_j gets the opposite.
template <typename A> DPM_HD A pair_coefficient(A upstream, A d, bool live) { return live ? upstream / d : A(0); }

}  // namespace dpm_ops::batch_hard_triplet
