// Schema of the fused batch-hard soft-margin triplet loss (kernels: csrc/batch_hard_triplet/, fake +
// autograd: dpm_ops/ops/batch_hard_triplet.py). Returns (loss, grad): with with_grad, the loss's
// gradient w.r.t. the features for a unit upstream gradient (the backward only rescales it); else empty.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  m.def("batch_hard_triplet(Tensor features, Tensor labels, bool with_grad) -> (Tensor, Tensor)");
}
