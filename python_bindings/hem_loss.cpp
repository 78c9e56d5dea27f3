// Schemas of DPM's fused HEM loss (kernels: csrc/hem_loss/, fake + autograd: dpm_ops/ops/hem_loss.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  // The scalar loss in the compute dtype (fp32, or fp64 for fp64 logits).
  m.def("hem_loss(Tensor cls_logits, float eps, str reduction) -> Tensor");
  // dL/d cls_logits (in cls_logits' dtype) for the upstream gradient `grad` (0-d, the loss's dtype).
  m.def("hem_loss_backward(Tensor grad, Tensor cls_logits, float eps, str reduction) -> Tensor");
}
