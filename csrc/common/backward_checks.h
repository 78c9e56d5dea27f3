// Checks of what a backward op takes from its forward (the upstream gradient, the forward's output and
// saved tensors). Autograd passes them with the forward's shapes, dtypes and device; a direct torch.ops
// call may not, and the kernels index and read them as the forward's (a mis-shaped grad was read past its
// end, a float64 one overran a CUDA kernel's buffer): a ValueError naming the argument instead.
#pragma once

#include <ATen/ATen.h>

namespace dpm_ops {

inline void check_from_forward(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                               at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have the forward's shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, " as the forward gives it, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " with the forward's inputs, got ",
                    t.device());
}

// The gradient of a scalar loss: one value, of any floating dtype and device (it is read as a number).
inline void check_loss_grad(const char* op, const at::Tensor& grad) {
  TORCH_CHECK_VALUE(grad.numel() == 1 && at::isFloatingType(grad.scalar_type()), op,
                    ": grad must be the loss's gradient, one floating-point value, got ", grad.scalar_type(),
                    " of shape ", grad.sizes());
}

}  // namespace dpm_ops
