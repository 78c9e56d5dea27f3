// ATen-side helpers shared by the CUDA entry points (csrc/<op>/<op>_cuda.cpp): the torch-free
// launchers take a Dtype, raw pointers and the current stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "dtype.h"

namespace dpm_ops {

inline Dtype dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Dtype::kFloat;
    case at::kDouble: return Dtype::kDouble;
    case at::kHalf: return Dtype::kHalf;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "dpm_ops CUDA kernels: unsupported dtype ", type);
  }
}

inline Dtype dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

}  // namespace dpm_ops
