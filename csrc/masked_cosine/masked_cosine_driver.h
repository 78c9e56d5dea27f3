// The masked cosine as GEMMs plus fused row/element passes, written once for any device.
//
// `Kernels` supplies the element and row passes for one device (CPU loops or CUDA
// kernels, both built on masked_cosine_math.h) and the dtype of its forward's GEMM operands
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
#include <vector>

namespace dpm_ops::masked_cosine {

// The prepared operands of both GEMMs (in the operand dtype the caller picks) and the inverse norms (in the
// accumulation type).
struct Prepared {
  at::Tensor query_scaled;  // xh * m            (B, C)
  at::Tensor mask_sq;       // m * m             (B, C)
  at::Tensor query_inv;     // 1/max(|x|, eps)   (B)
  at::Tensor proto_hat;     // ph                (K, C)
  at::Tensor proto_hat_sq;  // ph * ph           (K, C)
  at::Tensor proto_inv;     // 1/max(|p|, eps)   (K)
};

// GEMM operand policies of the Kernels structs' forwards. In the accumulation type: exact fp32 / fp64
// operands (the CPU: MKL has no faster reduced-precision path to trade for). In the input dtype:
// bf16 operands for tensor cores, products in fp32 (CUDA: masked_cosine's forward, e.g. an evaluation's
// distances); fp16's range is too narrow for the
// operands (mask values below 2^-7 square into subnormals, and xh*m too for small masks), so fp16
// inputs take fp32 operands (the Triton kernels do the same).
// The passes of a gradient (the training forward, whose C and den^2 the backward reuses, and the backward) take
// accumulation-type operands on every device: the mask's and prototypes' gradients are differences of nearly
// equal terms where a feature lies close to the prototypes' direction, and bf16 operands put them 4x the
// reference's rounding off (training shapes: the GEMMs are small).
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

// The backward's grad and out (B, K) in x's dtype (masked_cosine's) or its compute type (masked_cosine_train's),
// den_sq (B, K) in the compute type, as the forward gives them.
inline void check_backward_inputs(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& protos,
                                  const at::Tensor& out, const std::optional<at::Tensor>& den_sq) {
  const int64_t shape[] = {x.size(0), protos.size(0)};
  const char* op = "masked_cosine_backward";
  const at::ScalarType input = x.scalar_type(), compute = compute_type(input);
  const std::vector<at::ScalarType> either = input == compute ? std::vector{input} : std::vector{input, compute};
  check_from_forward(op, "grad", grad, shape, either, x.device());
  check_from_forward(op, "out", out, shape, either, x.device());
  if (den_sq.has_value()) check_from_forward(op, "den_sq", *den_sq, shape, compute, x.device());
}

template <class Kernels>
Prepared prepare(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos, double eps,
                 at::ScalarType operand_type) {
  const auto opts = x.options().dtype(compute_type(x.scalar_type()));
  const auto operand = x.options().dtype(operand_type);
  const int64_t B = x.size(0), K = protos.size(0), C = x.size(1);
  Prepared p{at::empty({B, C}, operand), at::empty({B, C}, operand), at::empty({B}, opts),
             at::empty({K, C}, operand), at::empty({K, C}, operand), at::empty({K}, opts)};
  Kernels::prepare_rows(x, mask, eps, p.query_scaled, p.mask_sq, p.query_inv);
  Kernels::prepare_rows(protos, at::Tensor(), eps, p.proto_hat, p.proto_hat_sq, p.proto_inv);
  return p;
}

// C = num / max(den, eps) (in place: num becomes C), num = (Xh*M) Ph^T, den^2 = M^2 (Ph^2)^T.
template <class Kernels> at::Tensor cosine_of(const Prepared& p, const at::Tensor& den_sq, double eps) {
  at::Tensor num = mm_acc(p.query_scaled, p.proto_hat.t());
  Kernels::cosine_epilogue(num, den_sq, eps);
  return num;
}

// Forward through two GEMMs on `operand_type` operands. Returns (C, den^2), both in the accumulation dtype:
// masked_cosine answers C in the input dtype, the training variant keeps both for the backward.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos,
                                           double eps, at::ScalarType operand_type) {
  const NoAutocastGuard no_autocast;
  const Prepared p = prepare<Kernels>(x, mask, protos, eps, operand_type);
  at::Tensor den_sq = mm_acc(p.mask_sq, p.proto_hat_sq.t());
  return {cosine_of<Kernels>(p, den_sq, eps), den_sq};
}

// Backward from the forward output `out` and, when the training forward kept it, den^2; without it den^2 is
// recomputed (one GEMM) rather than kept alive since the forward. An `out` rounded to a half dtype is
// recomputed too (one GEMM): the denominator's coefficient h = g*C/den^2 from a rounded C put the mask's and
// prototypes' gradients, differences of such terms, several times the dtype's rounding off.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& mask, const at::Tensor& protos,
                                                        const at::Tensor& out,
                                                        const std::optional<at::Tensor>& saved_den_sq, double eps) {
  const NoAutocastGuard no_autocast;
  const Prepared p = prepare<Kernels>(x, mask, protos, eps, accumulation_operands(x.scalar_type()));
  const at::ScalarType acc = p.query_inv.scalar_type();
  const at::Tensor den_sq = saved_den_sq.has_value() ? saved_den_sq->contiguous()
                                                     : mm_acc(p.mask_sq, p.proto_hat_sq.t());
  const at::Tensor cosine = out.scalar_type() == acc ? out.contiguous() : cosine_of<Kernels>(p, den_sq, eps);
  at::Tensor g_num = at::empty_like(den_sq), h = at::empty_like(den_sq);
  Kernels::backward_coefs(grad.to(acc).contiguous(), cosine, den_sq, eps, g_num, h);

  const at::Tensor u = mm_acc(g_num, p.proto_hat), v = mm_acc(h, p.proto_hat_sq);
  const at::Tensor up = mm_acc(g_num.t(), p.query_scaled), vp = mm_acc(h.t(), p.mask_sq);
  at::Tensor grad_x = at::empty_like(x), grad_mask = at::empty_like(mask), grad_protos = at::empty_like(protos);
  Kernels::query_rows_backward(x, mask, p.query_inv, u, v, eps, grad_x, grad_mask);
  Kernels::proto_rows_backward(protos, p.proto_inv, up, vp, eps, grad_protos);
  return {grad_x, grad_mask, grad_protos};
}

}  // namespace dpm_ops::masked_cosine
