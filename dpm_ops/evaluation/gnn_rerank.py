"""GNN re-ranking (Zhang, Jiang, Zheng, Tan, Ding, Yang, "Understanding Image Retrieval Re-Ranking: A
Graph Neural Network Perspective", arXiv 2012.07620) of query and gallery features, sparse.

The reference code (layumi's Person_reID_baseline_pytorch GPU-Re-Ranking, ``gnn_reranking``; the
method's authors' own repository holds only a README) builds dense N x N float32 matrices (35 GB each at
MSMT17 scale, and its CUDA kernels index them with 32-bit ints, which overflow past N = 46,340). Here the
k1-nearest search is the fused knn kernel's and the adjacency stays sparse: after two propagations a row
holds a few hundred items, not N (dpm_ops/ops/gnn_rerank_reference.py states the maths, csrc/gnn_rerank/
the kernels).

Reference semantics reproduced: features L2-normalised (the reference's callers normalise them), cosine
similarity, each item's k1 most similar items with itself among them (ties by index here, where torch.topk
leaves them unspecified), binary adjacency, weights S^2 on the first k2, two rounds of A + A^T, weighted
propagation and row L2 normalisation, skipped altogether when k2 == 1, and the score
(1 - lambda) <A_q, A_g> + lambda cos(q, g). k1 larger than the pooled set is capped at its size (the
reference's topk fails there); k2 larger than k1 uses k1 sources, as the reference's slice does.
"""

import torch

from .. import _backend
from ..ops.gnn_rerank import GNN_PROPAGATE, GNN_SIMILARITY_
from ..ops._checks import KNN_GPU_MAX_K
from ..ops.knn import check_certified_runs, check_strategy, self_knn
from . import _inputs
from ._copies import copy_groups, tie_copies
from ._inputs import RERANK_DEFAULTS, check_rerank_parameters
from ._select import TIE_MARGIN
from .distance import _check_tensors

# The reference's defaults (Market-1501: k1 26, k2 7; VeRi-776: 60, 10) and its blend weight.
GNN_K1, GNN_K2 = RERANK_DEFAULTS["gnn"]
GNN_LAMBDA = 0.3


def _pooled_unit_rows(qf, gf):
    """(the pooled rows L2-normalised (N, D) float32, Q)."""
    query, gallery = _check_tensors("gnn_rerank", qf, gf, "cosine", ("qf", "gf"), arithmetic=torch.float32)
    x = torch.cat([query, gallery]).float()
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = torch.nonzero(norms[:, 0] == 0).flatten()
    if len(zero):  # the reference's 0 / 0: its scores would all be NaN
        item = int(zero[0])
        name, row = ("qf", item) if item < len(query) else ("gf", item - len(query))
        what = "is all zeros" if not x[item].any() else "is too small to L2-normalise in float32 (its norm underflows)"
        raise ValueError(f"{name} row {row} {what}: GNN re-ranking needs features it can L2-normalise")
    return x / norms, len(query)


def gnn_rerank(qf, gf, k1: int = GNN_K1, k2: int = GNN_K2, lambda_value: float = GNN_LAMBDA, strategy: str = "auto"):
    """GNN re-ranked (Q, G) float32 distances of query features qf (Q, D) and gallery features gf (G, D).

    The distance is the negated score, -((1 - lambda) <A_q, A_g> + lambda cos(q, g)): ascending
    distances rank exactly as the reference's descending scores (ties by gallery index). Equal to the
    dense reference computation up to float32 summation order (within 2e-6 on the tests' features, 1e-5 with
    exactly duplicated rows) wherever no exact tie decides a neighbourhood; an item's exact copies tie with it
    in index order, as in the dense computation (their cosine distance, about -1e-7 from rounding, is set to
    the item's own 0: it ranked them before the item, by up to 0.7 in the scores), and the copies of another
    item at one similarity, in index order (the search computes a row's distances in several tiles or stages,
    a rounding residue apart), also where a group straddles the k1-th neighbour.
    Memory: the (Q, G) output, the (N, k1) neighbour lists and the sparse adjacency (a few hundred entries
    per row). ``strategy``: the neighbour search's, as for dpm_ops.ops.self_knn.
    numpy in, numpy out; torch in, torch out on the same device.
    """
    k1, k2, lambda_value = check_rerank_parameters(k1, k2, lambda_value)
    check_strategy(strategy, "gnn_rerank")
    x, num_query = _pooled_unit_rows(qf, gf)
    check_certified_runs(strategy, _backend.resolve(None, x.device), "gnn_rerank")
    n = len(x)
    width = min(k1, n)
    # the query x gallery cosine block only where the score blends it in (lambda 0: a whole GEMM saved)
    cross_rows = num_query if lambda_value > 0 else 0
    # Exact copies tie in index order (tie_copies), from a few more neighbours where a group straddles the k1-th
    # (within the GPU kernels' lists: a k1 they take is never refused for it).
    groups = copy_groups(x)
    search_width = width if groups is None else min(width + TIE_MARGIN, n, max(width, KNN_GPU_MAX_K))
    distances, neighbours, _, cross = self_knn(x, search_width, "cosine", cross_rows=cross_rows, strategy=strategy)
    tie_copies(distances, neighbours, groups)
    distances, neighbours = distances[:, :width], neighbours[:, :width]
    similarity = 1 - distances  # exact for the similarities >= 0.5 a neighbourhood is made of (Sterbenz)
    weights = (similarity * similarity)[:, :k2].contiguous()
    backend = _backend.resolve(None, x.device)
    stages = backend if backend in ("cpp", "cuda") else "reference"
    row_ptr = torch.arange(0, n * width + 1, width, device=x.device)
    cols = torch.sort(neighbours, dim=1).values.flatten()
    values = torch.ones(len(cols), dtype=torch.float32, device=x.device)
    if k2 != 1:
        sources = neighbours[:, :k2].contiguous()
        for _ in range(2):
            row_ptr, cols, values = GNN_PROPAGATE.run(stages, row_ptr, cols, values, sources, weights)
    if cross_rows:
        out = cross.contiguous().neg_().add_(1)  # 1 - (1 - cos), in place: -d + 1 is the same float as 1 - d
    else:
        out = x.new_zeros(num_query, n - num_query)
    GNN_SIMILARITY_.run(stages, out, row_ptr, cols, values, lambda_value)
    return _inputs.like_input(out.neg_(), qf)
