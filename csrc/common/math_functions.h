// exp / log1p for host and device code, one overload per precision (like square_root in
// host_device.h) so float code never silently widens to double.
#pragma once

#include <cmath>

#include "host_device.h"

namespace dpm_ops {

DPM_HD float exponential(float v) { return expf(v); }
DPM_HD double exponential(double v) { return ::exp(v); }
DPM_HD float log_one_plus(float v) { return log1pf(v); }
DPM_HD double log_one_plus(double v) { return ::log1p(v); }

// What a row function combines over the threads that share its row: nothing on the CPU, where one
// thread walks the whole row (the CUDA side has a warp version in warp_reduce.cuh).
struct SerialReduce {
  template <typename V> V sum(V v) const { return v; }
  template <typename V, class Pick> V pick(V v, Pick) const { return v; }
};

}  // namespace dpm_ops
