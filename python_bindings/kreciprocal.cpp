// Schemas of the sparse k-reciprocal re-ranking stages (kernels: csrc/kreciprocal/, callers:
// dpm_ops/evaluation/_kreciprocal.py). Sets and weights are CSR: row_ptr (N + 1), cols, values.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  m.def("kreciprocal_expand(Tensor neighbours, int k1, int half_k1) -> (Tensor row_ptr, Tensor cols)");
  m.def(
      "kreciprocal_pair_sqdist(Tensor features, Tensor cand_values, Tensor cand_indices, Tensor row_ptr, "
      "Tensor cols) -> Tensor");
  m.def(
      "kreciprocal_query_expansion(Tensor row_ptr, Tensor cols, Tensor values, Tensor sources)"
      " -> (Tensor row_ptr, Tensor cols, Tensor values)");
  m.def(
      "kreciprocal_jaccard_blend_(Tensor(a!) out, Tensor row_ptr, Tensor cols, Tensor values, float lambda_value, "
      "Tensor? row_scale=None) -> ()");
}
