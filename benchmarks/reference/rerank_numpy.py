"""Dense numpy port of k-reciprocal re-ranking (Zhong et al., CVPR 2017), written from
spec rerank_eval.md §1.3: the test oracle and speed baseline of dpm_ops re-ranking.

Semantics of the "ranklist" reference (q_g, q_q, g_g distances in, Q x G distances out):

1. pool queries and gallery (queries first, N = Q + G), square the Euclidean input (skipped
   for input="squared"), cast to float32, divide every column by its maximum over all N and
   transpose: item i's distances are column i of the pooled matrix;
2. rank every row; N(i, k) is the first k + 1 entries;
3. R(i, k) = {j in N(i, k) : i in N(j, k)};
4. R*(i) = R(i, k1) united with every R(c, kh), c in R(i, k1), kh = round-half-even(k1 / 2),
   for which 3 |R(c, kh) & R(i, k1)| > 2 |R(c, kh)|;
5. V[i, j] = exp(-d[i, j]) / sum over R*(i), for j in R*(i);
6. if k2 != 1, V[i] = mean of the rows V[rank[i, t]], t < k2 (self included);
7. Jaccard distance of the query rows against all N rows, 1 - m / (2 - m) with
   m = sum_k min(V[q, k], V[j, k]), found through an inverted index of V's columns;
8. (1 - lambda) * Jaccard + lambda * d, sliced to the gallery columns.

One deliberate change, from spec §1.5: the rows are ranked with a *stable* argsort so ties
are ordered by (value, index) (the original's quicksort leaves them unspecified). The column
max and transpose are kept as the original has them: for an asymmetric q_q / g_g they decide
which of d(i, j) and d(j, i) is item i's distance to j. The transpose is copied to a
contiguous array, which changes no value and keeps the argsort fast.
"""

import numpy as np


def euclidean_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 Euclidean distances through one BLAS GEMM, as most re-ID code computes them."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(squared, 0.0))


def _k_reciprocal(rank: np.ndarray, item: int, k: int) -> np.ndarray:
    forward = rank[item, : k + 1]
    backward = rank[forward, : k + 1]
    return forward[(backward == item).any(axis=1)]


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, input="euclidean"):
    num_query = q_g_dist.shape[0]
    pooled = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
    if input == "euclidean":
        pooled = np.square(pooled)
    dist = pooled.astype(np.float32, copy=False)
    del pooled
    dist /= dist.max(axis=0)
    dist = np.ascontiguousarray(dist.T)
    num_all = dist.shape[0]
    rank = np.argsort(dist, axis=1, kind="stable")
    half_k1 = int(np.around(k1 / 2.0))

    weights = np.zeros_like(dist)
    for item in range(num_all):
        reciprocal = _k_reciprocal(rank, item, k1)
        expanded = [reciprocal]
        for candidate in reciprocal:
            candidate_set = _k_reciprocal(rank, candidate, half_k1)
            if 3 * len(np.intersect1d(candidate_set, reciprocal)) > 2 * len(candidate_set):
                expanded.append(candidate_set)
        members = np.unique(np.concatenate(expanded))
        kernel = np.exp(-dist[item, members])
        weights[item, members] = kernel / np.sum(kernel)

    if k2 != 1:
        expanded_weights = np.zeros_like(weights)
        for item in range(num_all):
            expanded_weights[item] = np.mean(weights[rank[item, :k2]], axis=0)
        weights = expanded_weights
    del rank

    # Inverted index: for every column, the rows holding a non-zero weight there.
    rows, cols = np.nonzero(weights)
    by_column = np.argsort(cols, kind="stable")
    inverted = np.split(rows[by_column], np.cumsum(np.bincount(cols, minlength=num_all))[:-1])

    final = np.empty((num_query, num_all - num_query), dtype=np.float32)
    for query in range(num_query):
        overlap = np.zeros(num_all, dtype=np.float32)
        for col in np.flatnonzero(weights[query]):
            holders = inverted[col]
            overlap[holders] += np.minimum(weights[query, col], weights[holders, col])
        jaccard = 1 - overlap / (2 - overlap)
        final[query] = (jaccard * (1 - lambda_value) + dist[query] * lambda_value)[num_query:]
    return final


def re_ranking_from_features(query_features, gallery_features, k1=20, k2=6, lambda_value=0.3):
    """The baseline of rerank_features: dense distances (0 between equal features, the item itself included, as
    scipy's cdist gives, where the GEMM leaves a rounding residue) followed by re_ranking."""
    pooled = np.concatenate([query_features, gallery_features]).astype(np.float32)
    groups = np.unique(pooled + np.float32(0.0), axis=0, return_inverse=True)[1].reshape(-1)  # -0.0 as 0.0
    q = len(query_features)
    blocks = []
    for a, b, ga, gb in (
        (query_features, gallery_features, groups[:q], groups[q:]),
        (query_features, query_features, groups[:q], groups[:q]),
        (gallery_features, gallery_features, groups[q:], groups[q:]),
    ):
        distances = euclidean_distances(a, b)
        distances[ga[:, None] == gb[None, :]] = 0.0
        blocks.append(distances)
    return re_ranking(*blocks, k1, k2, lambda_value)
