// Schema of MaskReID's fused ranking loss (kernels: csrc/maskreid_ranking_loss/, fake + autograd:
// dpm_ops/ops/maskreid_ranking_loss.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  // Returns (loss, coef): the scalar loss and coef = G + Gᵀ with G = dL/dS (S = X Xᵀ), both in the
  // compute dtype (fp32, or fp64 for fp64 embeddings); the backward is dL/dX = grad · coef X.
  m.def(
      "maskreid_ranking_loss(Tensor embeddings, Tensor labels, float alpha, float lam, str neg_mode,"
      " str pos_mode) -> (Tensor, Tensor)");
  // dL/dX = grad · coef X, in the embeddings' dtype (grad: the 0-d upstream gradient of the loss).
  m.def("maskreid_ranking_loss_backward(Tensor grad, Tensor embeddings, Tensor coef) -> Tensor");
}
