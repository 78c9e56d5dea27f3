// fp32 GEMMs of the CPU kernels through oneDNN where torch has it.
//
// Why: at::mm on the CPU is MKL, which picks its code path by CPU vendor: on non-Intel x86 CPUs
// (AMD EPYC with AVX-512) it runs its generic path (MKL_VERBOSE: "Intel(R) Architecture processors"),
// 1.6-2.5x slower than oneDNN, which dispatches on the instruction set itself, at the masked cosine's
// shapes. oneDNN's fp32 matmul is IEEE fp32 (unless the user opts into reduced precision through
// torch.backends.mkldnn), so results differ from MKL's only in summation order.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

namespace dpm_ops {

// a (M, K) @ b (K, N) as a new contiguous (M, N) tensor: oneDNN for fp32 when torch was built with it,
// at::mm otherwise (other dtypes, builds without oneDNN).
inline at::Tensor cpu_mm(const at::Tensor& a, const at::Tensor& b) {
  // mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm) = X @ W^T, looked up once and called
  // boxed (its schema is stable; its C++ signature is torch's internal business).
  static const std::optional<c10::OperatorHandle> linear =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!linear.has_value() || a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || a.size(0) == 0 ||
      a.size(1) == 0 || b.size(1) == 0) {
    return at::mm(a, b);
  }
  std::vector<c10::IValue> stack{a, b.t(), c10::IValue(), c10::IValue("none"),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  linear->callBoxed(&stack);
  return stack.front().toTensor();
}

}  // namespace dpm_ops
