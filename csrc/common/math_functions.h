// exp / log / log1p, softplus and sigmoid for host and device code, one overload per precision (like
// square_root in host_device.h) so float code never silently widens to double.
#pragma once

#include <cmath>

#include "host_device.h"

namespace dpm_ops {

DPM_HD float exponential(float v) { return expf(v); }
DPM_HD double exponential(double v) { return ::exp(v); }
DPM_HD float log_one_plus(float v) { return log1pf(v); }
DPM_HD double log_one_plus(double v) { return ::log1p(v); }
DPM_HD float logarithm(float v) { return logf(v); }
DPM_HD double logarithm(double v) { return ::log(v); }

// log(1 + e^t) and 1 / (1 + e^-t) without overflow for large |t|.
template <typename A> DPM_HD A softplus(A t) {
  return max_of(t, A(0)) + log_one_plus(exponential(t < A(0) ? t : -t));  // max(t, 0) + log(1 + e^-|t|)
}
template <typename A> DPM_HD A sigmoid(A t) {
  const A e = exponential(t < A(0) ? t : -t);  // e^-|t| <= 1
  return t < A(0) ? e / (A(1) + e) : A(1) / (A(1) + e);
}

// What a row function combines over the threads that share its row: nothing on the CPU, where one
// thread walks the whole row (the CUDA side has a warp version in warp_reduce.cuh).
struct SerialReduce {
  template <typename V> V sum(V v) const { return v; }
  template <typename V, class Pick> V pick(V v, Pick) const { return v; }
};

}  // namespace dpm_ops
