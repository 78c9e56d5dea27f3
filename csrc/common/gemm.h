// The GEMMs of the GEMM-shaped ops (masked cosine, masked ArcFace CE, knn / self_knn) on every
// device, with fused epilogue / selection kernels around them.
//
// Design: the products go to ATen GEMMs (MKL on the CPU, cuBLAS on CUDA) rather than hand-written
// tiles. Hopper's tensor-core peak needs wgmma + TMA pipelines, which cuBLAS emits; a hand-written
// mma.sync tile would reach a fraction of it, and could not be run here before shipping. The fully
// fused single-pass kernels are the Triton backend (dpm_ops/triton/).
//
// Precision follows PyTorch's rules because ATen applies them: fp32 operands honour
// torch.get_float32_matmul_precision() ("highest": IEEE fp32, the default; "high" / "medium": TF32
// tensor cores), fp64 stays fp64, and bf16 / fp16 operands run on tensor cores with fp32
// accumulation, their product returned in fp32 through aten::mm.dtype (CUDA only, torch >= 2.8).
//
// mm_acc's CPU fp32 products (the masked cosine's GEMMs) go to oneDNN where torch has it: MKL picks its code path by CPU vendor, and on
// non-Intel x86 CPUs (AMD EPYC with AVX-512) runs its generic path (MKL_VERBOSE: "Intel(R)
// Architecture processors"), 1.6-2.5x slower at the masked cosine's shapes than oneDNN, which
// dispatches on the instruction set itself. oneDNN's fp32 matmul is IEEE fp32 (unless the user opts
// into reduced precision through torch.backends.mkldnn): results differ from MKL's in summation order only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include "compute_type.h"

namespace dpm_ops {

// a (M, K) @ b (K, N) for fp32 CPU tensors: oneDNN when torch was built with it, else at::mm.
inline at::Tensor cpu_mm_fp32(const at::Tensor& a, const at::Tensor& b) {
  // mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm) = X @ W^T, looked up once and called
  // boxed (its schema is stable; its C++ signature is torch's internal business).
  static const std::optional<c10::OperatorHandle> linear =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!linear.has_value() || a.numel() == 0 || b.numel() == 0) return at::mm(a, b);
  std::vector<c10::IValue> stack{a, b.t(), c10::IValue(), c10::IValue("none"),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  linear->callBoxed(&stack);
  return stack.front().toTensor();
}

// a @ b in the compute type of the operands' dtype. (The CPU has no aten::mm.dtype: there bf16 / fp16
// operands are widened first, exact products summed in fp32 as on the GPU.)
inline at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat) return cpu_mm_fp32(a, b);
  const at::ScalarType acc = compute_type(a.scalar_type());
  if (a.scalar_type() == acc) return at::mm(a, b);
  return a.is_cpu() ? at::mm(a.to(acc), b.to(acc)) : at::mm(a, b, acc);
}

// out = a @ b, `out` in the compute type of the operands' dtype (widened first on the CPU, as mm_acc).
inline void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType acc = out.scalar_type();
  if (a.scalar_type() == acc) at::mm_out(out, a, b);
  else if (a.is_cpu()) at::mm_out(out, a.to(acc), b.to(acc));
  else at::mm_out(out, a, b, acc);
}

}  // namespace dpm_ops
