// CUDA entry points of DPM's HEM loss (one block per sample, see hem_loss_kernels.cu). Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/no_autocast.h"
#include "hem_loss_cuda.h"
#include "hem_loss_driver.h"
#include "../common/aten_cuda.h"
#include "../common/register_kernels.h"

namespace dpm_ops::hem {
namespace {

constexpr int64_t kSharedLimit = 48 * 1024;  // without the opt-in for larger dynamic shared memory

Dtype checked_dtype(const at::Tensor& logits) {
  const Dtype dtype = dtype_of(logits);
  TORCH_CHECK_VALUE(cuda::shared_bytes(dtype, logits.size(1)) <= kSharedLimit, "hem_loss: cls_logits has ",
                    logits.size(1), " heads; the CUDA kernel keeps 2·heads² Gram entries in shared memory and takes "
                    "at most 54 (fp64) / 77 (fp32) heads");
  return dtype;
}

at::Tensor hem_loss_cuda(const at::Tensor& cls_logits, double eps, c10::string_view reduction) {
  const NoAutocastGuard no_autocast;
  const bool mean = check_inputs(cls_logits, eps, std::string(reduction));
  const c10::cuda::CUDAGuard guard(cls_logits.device());
  const at::Tensor a = cls_logits.contiguous();
  const Dtype dtype = checked_dtype(a);
  const auto acc = a.options().dtype(compute_type(a.scalar_type()));
  at::Tensor per_sample = at::empty({a.size(0)}, acc), loss = at::empty({}, acc);
  cuda::forward(dtype, a.const_data_ptr(), a.size(0), a.size(1), a.size(2), eps, sample_weight(a.size(0), mean),
                per_sample.data_ptr(), loss.data_ptr(), current_stream());
  return loss;
}

at::Tensor hem_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& cls_logits, double eps,
                                  c10::string_view reduction) {
  const NoAutocastGuard no_autocast;
  const bool mean = check_inputs(cls_logits, eps, std::string(reduction));
  check_loss_grad("hem_loss_backward", grad);
  const c10::cuda::CUDAGuard guard(cls_logits.device());
  const at::Tensor a = cls_logits.contiguous();
  const Dtype dtype = checked_dtype(a);
  // the loss's gradient may lie on any device (the CPU, another GPU): the kernel reads it on the logits'
  const at::Tensor g = grad.to(a.device(), compute_type(a.scalar_type())).contiguous();
  at::Tensor grad_a = at::empty_like(a);
  cuda::backward(dtype, g.const_data_ptr(), a.const_data_ptr(), a.size(0), a.size(1), a.size(2), eps,
                 sample_weight(a.size(0), mean), grad_a.data_ptr(), current_stream());
  return grad_a;
}

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "hem_loss", &hem_loss_cuda,
                "hem_loss_backward", &hem_loss_backward_cuda)

}  // namespace dpm_ops::hem
