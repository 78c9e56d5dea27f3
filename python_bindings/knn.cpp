// Schemas of the fused distance + top-k ops (kernels: csrc/knn/, fake + autograd + Triton:
// dpm_ops/ops/knn.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  // The k nearest rows of y for every row of x, sorted by (distance, index).
  m.def("knn(Tensor x, Tensor y, int k, str metric=\"euclidean\") -> (Tensor distances, Tensor indices)");
  // The k nearest rows of x for every row of x itself (self at distance 0), from the upper-triangle
  // tiles only on the CPU, from every row in full on CUDA; with normalize, ordered by
  // (distance / row max, index). Also every row's maximum and the block [0:cross_rows, cross_rows:]
  // of the distance matrix.
  m.def(
      "self_knn(Tensor x, int k, str metric=\"sqeuclidean\", bool normalize=False, int cross_rows=0)"
      " -> (Tensor distances, Tensor indices, Tensor row_max, Tensor cross)");
  // knn and self_knn by the certified two-stage search (CPU; docs/certified_knn.md): the same
  // results, and every row's number of stage-2 candidates (-1 where the row took the direct path).
  m.def(
      "knn_certified(Tensor x, Tensor y, int k, str metric=\"euclidean\")"
      " -> (Tensor distances, Tensor indices, Tensor candidates)");
  m.def(
      "self_knn_certified(Tensor x, int k, str metric=\"sqeuclidean\", bool normalize=False, int cross_rows=0)"
      " -> (Tensor distances, Tensor indices, Tensor row_max, Tensor cross, Tensor candidates)");
  // Stage 1's lower and upper bounds of every pair's distance (M, N): what the tests check.
  m.def("knn_certified_bounds(Tensor x, Tensor y, str metric=\"euclidean\") -> (Tensor lower, Tensor upper)");
}
