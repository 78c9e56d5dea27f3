// Schemas of the hierarchical masked pooling (kernels: csrc/hierarchical_mask_pool/, fake + autograd:
// dpm_ops/ops/hierarchical_mask_pool.py). The mask is a constant weight: it gets no gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  m.def("hierarchical_mask_pool(Tensor[] features, Tensor? mask, str mode) -> Tensor");
  m.def(
      "hierarchical_mask_pool_backward(Tensor grad, Tensor[] features, Tensor? mask, Tensor out, str mode)"
      " -> Tensor[]");
}
