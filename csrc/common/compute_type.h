// The one precision rule of every op: fp64 stays fp64, fp32 / fp16 / bf16 compute (accumulate,
// hold intermediates) in fp32. Spelled here for C++ types, for the torch-free Dtype of the CUDA
// launchers, and (outside nvcc) for ATen scalar types.
#pragma once

#include "dtype.h"

namespace dpm_ops {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

constexpr Dtype compute_type(Dtype t) { return t == Dtype::kDouble ? Dtype::kDouble : Dtype::kFloat; }

}  // namespace dpm_ops

#if !defined(__CUDACC__)  // the .cu files are compiled without torch
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace dpm_ops {

inline c10::ScalarType compute_type(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

// Two operands computed together: fp64 when either is.
inline c10::ScalarType compute_type(c10::ScalarType a, c10::ScalarType b) {
  return compute_type(a) == c10::kDouble ? c10::kDouble : compute_type(b);
}

// t in its compute type, contiguous (t itself when it already is).
inline at::Tensor as_compute(const at::Tensor& t) { return t.to(compute_type(t.scalar_type())).contiguous(); }

}  // namespace dpm_ops
#endif
