"""The sparse stages of GNN re-ranking as custom ops (C++ / CUDA kernels in csrc/gnn_rerank/; caller:
dpm_ops/evaluation/gnn_rerank.py; their torch versions, gnn_rerank_reference.py, run where the kernels
do not). The propagated adjacency is CSR: row_ptr (N + 1), cols, float32 values, whose length depends
on the data (an unbacked symbolic size in the fake functions, as for the k-reciprocal stages). No
autograd: re-ranking scores are not differentiated.
"""

import torch

from ._declare import declare
from .gnn_rerank_reference import gnn_propagate_reference, gnn_similarity_reference_
from .kreciprocal import ragged


def _fake_propagate(row_ptr, cols, values, sources, weights):
    return row_ptr.new_empty(row_ptr.shape), ragged(cols, torch.long), ragged(cols, torch.float32)


def _fake_similarity_(out, row_ptr, cols, values, lambda_value):
    return None


# normalise(W (A + A^T)), W[i, sources[i, t]] = weights[i, t]: one propagation round, as CSR.
GNN_PROPAGATE = declare(
    "gnn_propagate",
    "(Tensor row_ptr, Tensor cols, Tensor values, Tensor sources, Tensor weights)"
    " -> (Tensor row_ptr, Tensor cols, Tensor values)",
    _fake_propagate,
    reference=gnn_propagate_reference,
)
# out (Q, G) holds cos(q, g); overwritten in place by (1 - lambda) <A_q, A_{Q+g}> + lambda cos(q, g).
GNN_SIMILARITY_ = declare(
    "gnn_similarity_",
    "(Tensor(a!) out, Tensor row_ptr, Tensor cols, Tensor values, float lambda_value) -> ()",
    _fake_similarity_,
    reference=gnn_similarity_reference_,
)
