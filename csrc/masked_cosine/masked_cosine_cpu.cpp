// CPU kernels of the masked cosine: OpenMP row / element passes around MKL GEMMs.

#include "masked_cosine_cpu_kernels.h"
#include "../common/register_kernels.h"

namespace dpm_ops::masked_cosine {
namespace {

std::tuple<at::Tensor, at::Tensor> masked_cosine_train_cpu(const at::Tensor& x, const at::Tensor& mask,
                                                           const at::Tensor& protos, double eps) {
  check_inputs(x, mask, protos, eps);
  return forward<CpuKernels>(as_compute(x), as_compute(mask), as_compute(protos), eps,
                             accumulation_operands(x.scalar_type()));
}

at::Tensor masked_cosine_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos, double eps) {
  return std::get<0>(masked_cosine_train_cpu(x, mask, protos, eps)).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_cosine_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& protos,
    const at::Tensor& out, const std::optional<at::Tensor>& den_sq, double eps) {
  check_inputs(x, mask, protos, eps);
  check_backward_inputs(grad, x, protos, out, den_sq);
  auto [gx, gm, gp] = backward<CpuKernels>(grad, as_compute(x), as_compute(mask), as_compute(protos), out, den_sq, eps);
  return {gx.to(x.scalar_type()), gm.to(x.scalar_type()), gp.to(x.scalar_type())};
}

}  // namespace

DPM_OPS_KERNELS(CPU,
                "masked_cosine", &masked_cosine_cpu,
                "masked_cosine_train", &masked_cosine_train_cpu,
                "masked_cosine_backward", &masked_cosine_backward_cpu)

}  // namespace dpm_ops::masked_cosine
