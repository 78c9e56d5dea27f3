// Marks code that is compiled for the CPU by g++ and for the GPU by nvcc, so the
// per-element maths of every op is written once and tested on the CPU in CI.
#pragma once

#if defined(__CUDACC__)
#define DPM_HD __host__ __device__ __forceinline__
#else
#define DPM_HD inline
#endif

#include <cmath>

#include "compute_type.h"

namespace dpm_ops {

template <typename T> DPM_HD T max_of(T a, T b) { return a > b ? a : b; }

// One overload per precision so float code never silently widens to double.
DPM_HD float square_root(float v) { return sqrtf(v); }
DPM_HD double square_root(double v) { return ::sqrt(v); }

}  // namespace dpm_ops
