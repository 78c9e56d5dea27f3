// Small device helpers shared by the CUDA kernels (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "host_device.h"

namespace dpm_ops {

template <typename A> __device__ __forceinline__ A to_acc(float v) { return A(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return A(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) { return A(__half2float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return A(__bfloat162float(v)); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// combine(v of every thread) over the block (any blockDim.x that is a multiple of 32, at most 1024), in a
// fixed order (deterministic); every thread gets it. `combine` must be associative and commutative.
template <typename A, class Combine> __device__ A block_combine(A v, Combine combine) {
  __shared__ A warp_parts[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = combine(v, __shfl_down_sync(0xffffffffu, v, offset));
  if (lane == 0) warp_parts[warp] = v;
  __syncthreads();
  A total = warp_parts[0];
  for (int w = 1; w < int(blockDim.x + 31) / 32; ++w) total = combine(total, warp_parts[w]);
  __syncthreads();  // warp_parts may be reused by the next call
  return total;
}

template <typename A> __device__ A block_sum(A v) {
  return block_combine(v, [](A a, A b) { return a + b; });
}

}  // namespace dpm_ops
