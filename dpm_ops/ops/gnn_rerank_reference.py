"""GNN re-ranking (Zhang, Jiang, Zheng, Tan, Ding, Yang, "Understanding Image Retrieval Re-Ranking: A
Graph Neural Network Perspective", arXiv 2012.07620) in plain torch.

On the pooled set X of L2-normalised features (queries first, N = Q + G):

* S = X X^T; each item's k1 most similar items (itself first), in (similarity descending, index) order;
* A = the binary k1-nearest adjacency, W = S^2 on each item's k2 most similar (zero elsewhere);
* twice (skipped when k2 == 1, as the reference does): A <- A + A^T, A <- W A, each row of A divided
  by its L2 norm;
* score(q, g) = (1 - lambda) <A_q, A_g> + lambda cos(q, g).

`gnn_rerank_dense` is that computation on dense N x N matrices, as the reference code (layumi's
GPU-Re-Ranking, `gnn_reranking`) runs it: the baseline, and what the tests compare the sparse
pipeline with. The ``gnn_*_reference`` functions are the stages of the sparse pipeline (the ops of
gnn_rerank.py) on their CSR arguments, in torch: what backend "reference" runs, and what runs on GPU
tensors where the extension has no CUDA kernels. Nothing there is N x N.
"""

import torch

from ._ragged import expand_segments
from .kreciprocal_reference import csr_row_ptr, csr_rows

_PAIR_BUDGET = 1 << 24  # (query, gallery) products held at a time by the similarity stage


def gnn_rerank_dense(x: torch.Tensor, num_query: int, k1: int, k2: int, lambda_value: float) -> torch.Tensor:
    """The (Q, G) blended score of the pooled rows x (N, D), float32, L2-normalised, on dense matrices."""
    original_cos = x[:num_query] @ x[num_query:].T
    score = x @ x.T
    similarity, initial_rank = torch.sort(score, dim=1, descending=True, stable=True)
    similarity, initial_rank = similarity[:, :k1], initial_rank[:, :k1]
    adjacency = torch.zeros_like(score).scatter_(1, initial_rank, 1.0)
    weights = similarity * similarity
    if k2 != 1:
        for _ in range(2):
            adjacency = adjacency + adjacency.T
            propagated = torch.zeros_like(adjacency)
            for j in range(min(k2, k1)):  # the reference kernel's loop over its [:, :k2] slice, row after row
                propagated += adjacency[initial_rank[:, j]] * weights[:, j, None]
            adjacency = propagated / torch.linalg.vector_norm(propagated, dim=1, keepdim=True)
    propagated_similarity = adjacency[:num_query] @ adjacency[num_query:].T
    return (1 - lambda_value) * propagated_similarity + lambda_value * original_cos


def _coalesce(keys: torch.Tensor, values: torch.Tensor):
    """Entries with equal keys summed (each key here has at most two entries, whose float sum is the
    same in either order), keys ascending."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    return unique, torch.zeros(len(unique), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def gnn_propagate_reference(row_ptr, cols, values, sources, weights):
    """Row i of normalise(W (A + A^T)) with W[i, sources[i, t]] = weights[i, t]: A + A^T formed first,
    then the weighted source rows added in t order, then each row divided by its L2 norm (float64 sum of
    squares). CSR in, CSR out (cols ascending)."""
    n = len(row_ptr) - 1
    rows = csr_rows(row_ptr)
    values, weights = values.float(), weights.float()
    keys, both = _coalesce(torch.cat([rows * n + cols, cols * n + rows]), torch.cat([values, values]))
    sym_ptr = csr_row_ptr(keys // n, n)
    sym_cols = keys % n
    keys = torch.empty(0, dtype=torch.long, device=row_ptr.device)
    sums = torch.empty(0, dtype=torch.float32, device=row_ptr.device)
    for t in range(sources.shape[1]):
        source = sources[:, t]
        item, position = expand_segments(sym_ptr[source], sym_ptr[source + 1] - sym_ptr[source])
        term = both[position] * weights[item, t]
        keys, sums = _coalesce(torch.cat([keys, item * n + sym_cols[position]]), torch.cat([sums, term]))
    out_rows = keys // n
    norms = torch.zeros(n, dtype=torch.float64, device=row_ptr.device).index_add_(0, out_rows, sums.double() ** 2)
    return csr_row_ptr(out_rows, n), keys % n, sums / norms.sqrt().float()[out_rows]


def _query_blocks(pairs_per_query: torch.Tensor):
    """Consecutive query ranges [start, stop) of at most _PAIR_BUDGET (query, gallery) products each (one
    query at least)."""
    ends = torch.cumsum(pairs_per_query, 0).tolist()
    start, done = 0, 0
    while start < len(ends):
        stop = max(start + 1, int(torch.searchsorted(torch.tensor(ends), done + _PAIR_BUDGET, right=True)))
        yield start, stop
        start, done = stop, ends[stop - 1]


def gnn_similarity_reference_(out, row_ptr, cols, values, lambda_value):
    """out (Q, G) holds cos(q, g); overwritten by (1 - lambda) <A_q, A_{Q+g}> + lambda cos(q, g), the
    products of each pair summed in the query row's column order through an inverted index of the
    gallery rows (as the kernels)."""
    num_query, num_gallery = out.shape
    n = num_query + num_gallery
    rows, values = csr_rows(row_ptr), values.float()
    first = int(row_ptr[num_query])
    by_column = torch.sort(cols[first:], stable=True).indices
    holder, holder_value = rows[first:][by_column] - num_query, values[first:][by_column]
    column_ptr = csr_row_ptr(cols[first:][by_column], n)
    column_size = column_ptr.diff()
    pairs_per_query = torch.zeros(num_query, dtype=torch.long, device=out.device)
    pairs_per_query.index_add_(0, rows[:first], column_size[cols[:first]])
    for start, stop in _query_blocks(pairs_per_query.cpu()):
        entries = torch.arange(int(row_ptr[start]), int(row_ptr[stop]), device=out.device)
        entry, position = expand_segments(column_ptr[cols[entries]], column_size[cols[entries]])
        slot = (rows[entries][entry] - start) * num_gallery + holder[position]
        products = values[entries][entry] * holder_value[position]
        dots = torch.zeros((stop - start) * num_gallery, dtype=torch.float32, device=out.device)
        dots = dots.index_add_(0, slot, products).view(stop - start, num_gallery)
        out[start:stop] = dots * (1 - lambda_value) + out[start:stop] * lambda_value
    return out
