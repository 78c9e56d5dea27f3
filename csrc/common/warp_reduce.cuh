// Warp-wide combination for row functions written with (start, step) loops and a reducer
// (see SerialReduce in math_functions.h): the 32 lanes of a warp share one row and every lane
// gets the combined value. xor butterflies are symmetric, so all lanes hold bit-identical results.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_utils.cuh"

namespace dpm_ops {

struct WarpReduce {
  template <typename V> __device__ __forceinline__ V sum(V v) const {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
  }
  // `pick(a, b)` chooses one of two candidates; it must be symmetric (same choice for (b, a)).
  // V is a struct of `value` and `index` fields.
  template <typename V, class Pick> __device__ __forceinline__ V pick(V v, Pick pick_one) const {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      V other;
      other.value = __shfl_xor_sync(0xffffffffu, v.value, offset);
      other.index = __shfl_xor_sync(0xffffffffu, v.index, offset);
      v = pick_one(v, other);
    }
    return v;
  }
};

// out[0] = scale * sum(values[0..n)), one block, fixed order (deterministic).
// Launch with one block of a multiple of 32 threads.
template <typename A>
__global__ void scaled_sum_kernel(const A* __restrict__ values, int64_t n, A scale, A* __restrict__ out) {
  A partial = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) partial += values[i];
  const A total = block_sum(partial);
  if (threadIdx.x == 0) out[0] = total * scale;
}

}  // namespace dpm_ops
