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

#include <limits>

namespace dpm_ops {

inline c10::ScalarType compute_type(c10::ScalarType t) { return t == c10::kDouble ? c10::kDouble : c10::kFloat; }

// Two operands computed together: fp64 when either is.
inline c10::ScalarType compute_type(c10::ScalarType a, c10::ScalarType b) {
  return compute_type(a) == c10::kDouble ? c10::kDouble : compute_type(b);
}

// The least eps (a norm's floor or an addend of its square) the ops take for input of type t: the smallest normal
// number of its compute type (1.2e-38 in fp32). A subnormal one may be flushed to 0, and the row divided by 0.
inline double smallest_normal(c10::ScalarType t) {
  return compute_type(t) == c10::kDouble ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
}

// t in its compute type, contiguous (t itself when it already is).
inline at::Tensor as_compute(const at::Tensor& t) { return t.to(compute_type(t.scalar_type())).contiguous(); }

}  // namespace dpm_ops
#endif
