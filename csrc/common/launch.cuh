// The host side of every torch-free CUDA launcher: the storage type a Dtype names, the typed view
// of the raw pointers, and the check that the launches went through (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "compute_type.h"
#include "dtype.h"

namespace dpm_ops {

// A storage type and the type it computes in (compute_type.h).
template <typename T> struct TypeTag {
  using type = T;
  using acc = acc_t<T>;
};

// The launchers take arrays as void*; a kernel takes them typed.
template <typename T> const T* typed(const void* p) { return static_cast<const T*>(p); }
template <typename T> T* typed(void* p) { return static_cast<T*>(p); }

// Blocks of `threads` threads covering n items, a thread each (kernels that stride over the grid cap theirs).
inline unsigned int blocks_for(int64_t n, int threads) {
  return static_cast<unsigned int>((n + threads - 1) / threads);
}

// A thread's index in the whole grid, and the grid's thread count (grid-stride loops).
__device__ __forceinline__ int64_t thread_index() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t thread_count() { return int64_t(gridDim.x) * blockDim.x; }

inline void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw std::runtime_error("dpm_ops " + what + " failed: " + cudaGetErrorString(err));
}

// Throws when a launch made on this thread since the last check failed (bad configuration, no
// kernel image for the device, ...); the kernels themselves run asynchronously.
inline void check_launch() { check_cuda(cudaGetLastError(), "CUDA kernel launch"); }

// Runs the launches of f(TypeTag<T>{}) for the storage type T that `dtype` names, then checks them.
template <typename F> void launch_typed(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::kFloat: f(TypeTag<float>{}); break;
    case Dtype::kDouble: f(TypeTag<double>{}); break;
    case Dtype::kHalf: f(TypeTag<__half>{}); break;
    case Dtype::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
  }
  check_launch();
}

// The same for arrays held in the compute type of `dtype` (fp32 or fp64): f(TypeTag<float or double>{}).
template <typename F> void launch_computed(Dtype dtype, F&& f) {
  if (compute_type(dtype) == Dtype::kDouble) f(TypeTag<double>{});
  else f(TypeTag<float>{});
  check_launch();
}

}  // namespace dpm_ops
