// Schemas of DPM's fused masked ArcFace cross-entropy (kernels: csrc/masked_arcface/, fake +
// autograd: dpm_ops/ops/masked_arcface.py). The forward also returns each row's log-sum-exp of the
// masked and plain logits, so the backward rebuilds the softmax without any saved (B, K) matrix.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  m.def(
      "masked_arcface_ce(Tensor features, Tensor mask, Tensor weight, Tensor labels, float scale, float margin,"
      " bool easy_margin, float clamp_eps, float plain_weight, float masked_weight) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_arcface_ce_backward(Tensor grad, Tensor features, Tensor mask, Tensor weight, Tensor labels,"
      " Tensor masked_lse, Tensor plain_lse, float scale, float margin, bool easy_margin, float clamp_eps,"
      " float plain_weight, float masked_weight) -> (Tensor, Tensor, Tensor)");
}
