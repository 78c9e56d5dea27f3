// The masked cosine as GEMMs plus fused row/element passes, written once for any device.
//
// `Kernels` supplies the element and row passes for one device (CPU loops or CUDA
// kernels, both built on masked_cosine_math.h) and the dtype of the GEMM operands
// (Kernels::operand_type); the GEMMs go to ATen (MKL / cuBLAS: why and with which precision,
// common/gemm.h). Products and intermediates are held in the accumulation type (fp32, or fp64
// for fp64 inputs).
#pragma once

#include <ATen/ATen.h>

#include "../common/backward_checks.h"
#include "../common/compute_type.h"
#include "../common/gemm.h"
#include "../common/no_autocast.h"

#include <cmath>
#include <optional>
#include <tuple>

namespace dpm_ops::masked_cosine {

// The prepared operands of both GEMMs (in Kernels::operand_type) and the inverse norms (in the
// accumulation type).
struct Prepared {
  at::Tensor query_scaled;  // xh * m            (B, C)
  at::Tensor mask_sq;       // m * m             (B, C)
  at::Tensor query_inv;     // 1/max(|x|, eps)   (B)
  at::Tensor proto_hat;     // ph                (K, C)
  at::Tensor proto_hat_sq;  // ph * ph           (K, C)
  at::Tensor proto_inv;     // 1/max(|p|, eps)   (K)
};

// GEMM operand policies of the Kernels structs. In the accumulation type: exact fp32 / fp64
// operands (the CPU: MKL has no faster reduced-precision path to trade for). In the input dtype:
// bf16 operands for tensor cores, products in fp32 (CUDA); fp16's range is too narrow for the
// operands (mask values below 2^-7 square into subnormals, and xh*m too for small masks), so fp16
// inputs take fp32 operands (the Triton kernels do the same).
inline at::ScalarType accumulation_operands(at::ScalarType input) { return compute_type(input); }
inline at::ScalarType input_operands(at::ScalarType input) { return input == at::kHalf ? at::kFloat : input; }

// Argument checks shared by every device's entry point (Python checks the same first,
// with the same messages, so direct torch.ops callers get them too).
inline void check_inputs(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos, double eps) {
  TORCH_CHECK_VALUE(x.dim() == 2, "masked_cosine: x must be 2-D (B, C), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(protos.dim() == 2, "masked_cosine: protos must be 2-D (K, C), got ", protos.dim(), "-D");
  TORCH_CHECK_VALUE(mask.sizes() == x.sizes(), "masked_cosine: mask must have the shape of x ", x.sizes(),
              ", got ", mask.sizes());
  TORCH_CHECK_VALUE(protos.size(1) == x.size(1), "masked_cosine: protos must have C = ", x.size(1),
              " columns like x, got ", protos.size(1));
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "masked_cosine: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK_VALUE(mask.scalar_type() == x.scalar_type() && protos.scalar_type() == x.scalar_type(),
              "masked_cosine: x, mask and protos must share one dtype, got ", x.scalar_type(), ", ",
              mask.scalar_type(), ", ", protos.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == x.device() && protos.device() == x.device(),
              "masked_cosine: x, mask and protos must be on one device, got ", x.device(), ", ",
              mask.device(), ", ", protos.device());
  // eps floors norms computed from their squares: below the square root of the smallest normal number a norm
  // underflows to 0 and a smaller eps takes its place
  const double least_eps = std::sqrt(smallest_normal(x.scalar_type()));
  TORCH_CHECK_VALUE(eps >= least_eps && std::isfinite(eps), "masked_cosine: eps must be finite and >= ", least_eps,
                    ", the square root of the smallest normal ", compute_type(x.scalar_type()), " number, got ", eps);
}

// The backward's grad and out (B, K) in x's dtype, den_sq (B, K) in its compute type, as the forward gives them.
inline void check_backward_inputs(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& protos,
                                  const at::Tensor& out, const std::optional<at::Tensor>& den_sq) {
  const int64_t shape[] = {x.size(0), protos.size(0)};
  const char* op = "masked_cosine_backward";
  check_from_forward(op, "grad", grad, shape, x.scalar_type(), x.device());
  check_from_forward(op, "out", out, shape, x.scalar_type(), x.device());
  if (den_sq.has_value()) check_from_forward(op, "den_sq", *den_sq, shape, compute_type(x.scalar_type()), x.device());
}

template <class Kernels>
Prepared prepare(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos, double eps) {
  const auto opts = x.options().dtype(compute_type(x.scalar_type()));
  const auto operand = x.options().dtype(Kernels::operand_type(x.scalar_type()));
  const int64_t B = x.size(0), K = protos.size(0), C = x.size(1);
  Prepared p{at::empty({B, C}, operand), at::empty({B, C}, operand), at::empty({B}, opts),
             at::empty({K, C}, operand), at::empty({K, C}, operand), at::empty({K}, opts)};
  Kernels::prepare_rows(x, mask, eps, p.query_scaled, p.mask_sq, p.query_inv);
  Kernels::prepare_rows(protos, at::Tensor(), eps, p.proto_hat, p.proto_hat_sq, p.proto_inv);
  return p;
}

// Forward through two GEMMs: C = ((Xh*M) Ph^T) / max(sqrt(M^2 (Ph^2)^T), eps).
// Returns (C in the input dtype, den^2 in the accumulation dtype).
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos,
                                           double eps) {
  const NoAutocastGuard no_autocast;
  const Prepared p = prepare<Kernels>(x, mask, protos, eps);
  at::Tensor num = mm_acc(p.query_scaled, p.proto_hat.t());
  at::Tensor den_sq = mm_acc(p.mask_sq, p.proto_hat_sq.t());
  Kernels::cosine_epilogue(num, den_sq, eps);  // in place: num becomes C
  return {num.to(x.scalar_type()), den_sq};
}

// Backward from the forward output `out` and, when the training forward kept it, den^2;
// without it den^2 is recomputed (one GEMM) rather than kept alive since the forward.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& mask, const at::Tensor& protos,
                                                        const at::Tensor& out,
                                                        const std::optional<at::Tensor>& saved_den_sq, double eps) {
  const NoAutocastGuard no_autocast;
  const Prepared p = prepare<Kernels>(x, mask, protos, eps);
  const at::Tensor den_sq = saved_den_sq.has_value() ? saved_den_sq->contiguous()
                                                     : mm_acc(p.mask_sq, p.proto_hat_sq.t());
  at::Tensor g_num = at::empty_like(den_sq), h = at::empty_like(den_sq);
  Kernels::backward_coefs(grad, out, den_sq, eps, g_num, h);
  // The coefficients enter the GEMMs in the operand type (bf16 has fp32's range, fp16 inputs have
  // fp32 operands); `.to` is a no-op where the types already agree.
  const at::ScalarType operand = p.query_scaled.scalar_type();
  g_num = g_num.to(operand);
  h = h.to(operand);

  const at::Tensor u = mm_acc(g_num, p.proto_hat), v = mm_acc(h, p.proto_hat_sq);
  const at::Tensor up = mm_acc(g_num.t(), p.query_scaled), vp = mm_acc(h.t(), p.mask_sq);
  at::Tensor grad_x = at::empty_like(x), grad_mask = at::empty_like(mask), grad_protos = at::empty_like(protos);
  Kernels::query_rows_backward(x, mask, p.query_inv, u, v, eps, grad_x, grad_mask);
  Kernels::proto_rows_backward(protos, p.proto_inv, up, vp, eps, grad_protos);
  return {grad_x, grad_mask, grad_protos};
}

}  // namespace dpm_ops::masked_cosine
