// Schema of DPM's fused masked ArcFace cross-entropy (kernels: csrc/masked_arcface/, fake + autograd:
// dpm_ops/ops/masked_arcface.py). Returns (loss, grad_features, grad_mask, grad_weight): with
// with_grad, the loss's gradients for a unit upstream gradient, computed in the same pass (the loss is
// a scalar, so the backward only rescales them); without, three empty tensors.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  m.def(
      "masked_arcface_ce(Tensor features, Tensor mask, Tensor weight, Tensor labels, float scale, float margin,"
      " bool easy_margin, float clamp_eps, float plain_weight, float masked_weight, bool with_grad)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}
