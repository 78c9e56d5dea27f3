// Schemas of DPM's masked prototype cosine (kernels: csrc/masked_cosine/, fake + autograd:
// dpm_ops/ops/masked_cosine.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  m.def("masked_cosine(Tensor x, Tensor mask, Tensor protos, float eps=1e-12) -> Tensor");
  // The training variant also returns den^2 (B, K) in the accumulation dtype, so that the backward
  // skips the GEMM that recomputes it; without it (den_sq=None) the backward recomputes.
  m.def("masked_cosine_train(Tensor x, Tensor mask, Tensor protos, float eps=1e-12) -> (Tensor, Tensor)");
  m.def(
      "masked_cosine_backward(Tensor grad, Tensor x, Tensor mask, Tensor protos, Tensor out, Tensor? den_sq,"
      " float eps) -> (Tensor, Tensor, Tensor)");
}
