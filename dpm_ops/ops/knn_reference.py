"""Plain-PyTorch reference of the fused distance + top-k ops (the executable specification).

    distance(x_i, y_j) = sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0))     "euclidean"
                       = max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 0)           "sqeuclidean"
                       = 1 - x^_i . y^_j, v^ = v / max(|v|, 1e-12)       "cosine"

knn: for every row of x, the k rows of y with the smallest distance, sorted by (distance, index),
i.e. the first k entries of a *stable* sort of the full distance row. Computed in float32 for
float16 / bfloat16 / float32 inputs and in float64 for float64.

self_knn: the same for x against itself with d(i, i) = 0 exactly; with normalize=True the rows
are ordered by (d(i, j) / max_j' d(i, j'), index) (re-ranking's row-max normalisation; an all-zero
row keeps its raw order) and the returned distances stay un-normalised. Also returns every row's
maximum and the block d[:cross_rows, cross_rows:].
"""

import torch
import torch.nn.functional as F

from .._precision import compute_dtype, sqrt_flat_at_zero

METRICS = ("euclidean", "sqeuclidean", "cosine")
COSINE_EPS = 1e-12


def pairwise_distance_reference(x: torch.Tensor, y: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    dtype = compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    if metric == "cosine":
        return 1 - F.normalize(x, dim=1, eps=COSINE_EPS) @ F.normalize(y, dim=1, eps=COSINE_EPS).T
    squared = ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)).clamp_min(0)
    return sqrt_flat_at_zero(squared) if metric == "euclidean" else squared


def knn_reference(x: torch.Tensor, y: torch.Tensor, k: int, metric: str = "euclidean"):
    values, order = torch.sort(pairwise_distance_reference(x, y, metric), dim=1, stable=True)
    return values[:, :k], order[:, :k]


def self_knn_reference(
    x: torch.Tensor, k: int, metric: str = "sqeuclidean", normalize: bool = False, cross_rows: int = 0
):
    full = pairwise_distance_reference(x, x, metric)
    full = full * (1 - torch.eye(len(x), dtype=full.dtype, device=full.device))  # d(i, i) = 0, keeps autograd
    row_max = full.amax(dim=1) if len(x) else full.new_zeros(0)
    key = full / torch.where(row_max > 0, row_max, 1)[:, None] if normalize else full
    order = torch.sort(key, dim=1, stable=True).indices[:, :k]
    return full.gather(1, order), order, row_max, full[:cross_rows, cross_rows:]
