// Schema of the sort-free Market-1501 evaluator kernel (csrc/rank/; caller:
// dpm_ops/evaluation/rank.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dpm_ops, m) {
  // For every query, the ranks of its matches (same pid, other camera) among the kept gallery
  // items (same pid and camera removed), ordered by (distance, index): CSR (offsets, ranks).
  m.def("match_ranks(Tensor distmat, Tensor q_pids, Tensor g_pids, Tensor q_camids, Tensor g_camids)"
        " -> (Tensor offsets, Tensor ranks)");
}
