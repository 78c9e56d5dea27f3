// CUDA entry points of the masked cosine: the shared GEMM driver (cuBLAS, on tensor cores as
// common/gemm.h says) with the CUDA element / row kernels. Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "masked_cosine_cuda.h"
#include "masked_cosine_driver.h"
#include "../common/aten_cuda.h"
#include "../common/register_kernels.h"

namespace dpm_ops::masked_cosine {
namespace {

struct CudaKernels {
  static constexpr auto operand_type = input_operands;  // bf16 GEMMs on tensor cores, fp16 in fp32

  static void prepare_rows(const at::Tensor& v, const at::Tensor& mult, double eps, at::Tensor& scaled,
                           at::Tensor& second, at::Tensor& inv) {
    cuda::prepare_rows(dtype_of(v), dtype_of(scaled), v.const_data_ptr(), data_or_null(mult), v.size(0), v.size(1),
                       eps, scaled.data_ptr(), second.data_ptr(), inv.data_ptr(), current_stream());
  }
  static void cosine_epilogue(at::Tensor& num, const at::Tensor& den_sq, double eps) {
    cuda::cosine_epilogue(dtype_of(num), num.data_ptr(), den_sq.const_data_ptr(), num.numel(), eps,
                          current_stream());
  }
  static void backward_coefs(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& den_sq, double eps,
                             at::Tensor& g_num, at::Tensor& h) {
    cuda::backward_coefs(dtype_of(den_sq), grad.const_data_ptr(), out.const_data_ptr(), den_sq.const_data_ptr(),
                         den_sq.numel(), eps, g_num.data_ptr(), h.data_ptr(), current_stream());
  }
  static void query_rows_backward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& inv,
                                  const at::Tensor& u, const at::Tensor& v, double eps, at::Tensor& grad_x,
                                  at::Tensor& grad_mask) {
    cuda::query_rows_backward(dtype_of(x), x.const_data_ptr(), mask.const_data_ptr(), inv.const_data_ptr(),
                              u.const_data_ptr(), v.const_data_ptr(), x.size(0), x.size(1), eps, grad_x.data_ptr(),
                              grad_mask.data_ptr(), current_stream());
  }
  static void proto_rows_backward(const at::Tensor& protos, const at::Tensor& inv, const at::Tensor& up,
                                  const at::Tensor& vp, double eps, at::Tensor& grad_protos) {
    cuda::proto_rows_backward(dtype_of(protos), protos.const_data_ptr(), inv.const_data_ptr(), up.const_data_ptr(),
                              vp.const_data_ptr(), protos.size(0), protos.size(1), eps, grad_protos.data_ptr(),
                              current_stream());
  }
};

// (C, den^2) in the accumulation type, from GEMMs on `operand` operands.
std::tuple<at::Tensor, at::Tensor> checked_forward(const at::Tensor& x, const at::Tensor& mask,
                                                   const at::Tensor& protos, double eps, at::ScalarType operand) {
  check_inputs(x, mask, protos, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  return forward<CudaKernels>(x.contiguous(), mask.contiguous(), protos.contiguous(), eps, operand);
}

std::tuple<at::Tensor, at::Tensor> masked_cosine_train_cuda(const at::Tensor& x, const at::Tensor& mask,
                                                            const at::Tensor& protos, double eps) {
  return checked_forward(x, mask, protos, eps, accumulation_operands(x.scalar_type()));
}

at::Tensor masked_cosine_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos, double eps) {
  const at::ScalarType operand = CudaKernels::operand_type(x.scalar_type());
  return std::get<0>(checked_forward(x, mask, protos, eps, operand)).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_cosine_backward_cuda(const at::Tensor& grad,
                                                                         const at::Tensor& x,
                                                                         const at::Tensor& mask,
                                                                         const at::Tensor& protos,
                                                                         const at::Tensor& out,
                                                                         const std::optional<at::Tensor>& den_sq,
                                                                         double eps) {
  check_inputs(x, mask, protos, eps);
  check_backward_inputs(grad, x, protos, out, den_sq);
  const c10::cuda::CUDAGuard guard(x.device());
  return backward<CudaKernels>(grad, x.contiguous(), mask.contiguous(), protos.contiguous(), out, den_sq, eps);
}

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "masked_cosine", &masked_cosine_cuda,
                "masked_cosine_train", &masked_cosine_train_cuda,
                "masked_cosine_backward", &masked_cosine_backward_cuda)

}  // namespace dpm_ops::masked_cosine
