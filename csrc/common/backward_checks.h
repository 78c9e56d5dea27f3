// Checks of what a backward op takes from its forward (the upstream gradient, the forward's output and
// saved tensors). Autograd passes them with the forward's shapes, dtypes and device; a direct torch.ops
// call may not, and the kernels index and read them as the forward's (a mis-shaped grad was read past its
// end, a float64 one overran a CUDA kernel's buffer): a ValueError naming the argument instead.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

namespace dpm_ops {

// `dtypes`: the one the forward gives, or the few a backward takes (e.g. rounded or not).
inline void check_from_forward(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                               at::ArrayRef<at::ScalarType> dtypes, const at::Device& device) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have the forward's shape ", shape, ", got ",
                    t.sizes());
  if (std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) == dtypes.end()) {
    std::string expected;
    for (const at::ScalarType dtype : dtypes) {
      expected += (expected.empty() ? "" : " or ") + std::string(c10::toString(dtype));
    }
    TORCH_CHECK_VALUE(false, op, ": ", name, " must be ", expected, " as the forward gives it, got ", t.scalar_type());
  }
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
