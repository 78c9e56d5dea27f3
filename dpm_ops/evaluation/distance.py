"""Pairwise distances and exact k-nearest neighbours, computed in bounded-size tiles.

Metrics: "euclidean" sqrt(|x|^2 + |y|^2 - 2 x.y), "sqeuclidean" (no sqrt), "cosine"
1 - x.y / (|x| |y|). The GEMM form is what re-ID code uses; it makes the distance of a row to
itself a few ulps above 0 rather than exactly 0. float16 / bfloat16 inputs are computed in
float32, float64 stays float64.
"""

import torch
import torch.nn.functional as F

from .. import _backend
from .._precision import compute_dtype, sqrt_flat_at_zero
from ..ops._checks import KNN_GPU_MAX_K, check_euclidean_scale
from ..ops.knn import check_strategy
from ..ops.knn import knn as knn_op
from ..ops.knn_reference import METRICS
from . import _inputs
from ._select import TIE_MARGIN, RunningSmallest, resolve_smallest

TILE_ROWS = 1024
TILE_COLUMNS = 4096


class _Operand:
    """Features prepared once for repeated tiles: cast, normalised for cosine, squared norms."""

    def __init__(self, features: torch.Tensor, metric: str, dtype: torch.dtype):
        features = features.to(dtype)
        if metric == "cosine":
            features = F.normalize(features, dim=1)
        self.features = features.contiguous()
        self.squared_norms = (features * features).sum(dim=1)

    def rows(self, start: int, stop: int):
        return self.features[start:stop], self.squared_norms[start:stop]


def raw_distance(x, x_norms, y, y_norms, metric: str, out=None) -> torch.Tensor:
    """Squared Euclidean for "euclidean"/"sqeuclidean", 1 - cos for "cosine"."""
    if metric == "cosine":
        return torch.mm(x, y.T, out=out).neg_().add_(1.0)
    block = torch.addmm(y_norms[None, :], x, y.T, alpha=-2.0, out=out)
    return block.add_(x_norms[:, None]).clamp_min_(0.0)


def finish_distance(raw: torch.Tensor, metric: str) -> torch.Tensor:
    return raw.sqrt_() if metric == "euclidean" else raw


def _check_tensors(op, x, y, metric, names=("x", "y"), arithmetic=None):
    """x and y as checked 2-D float tensors; `names`: what the messages call them (the compat drop-ins
    pass their peers' argument names); `arithmetic`: the dtype the caller computes in, whatever the inputs'
    (the float32 re-ranking pipelines; None: the inputs' compute dtype)."""
    _inputs.check_choice("metric", metric, METRICS)
    x_t = _inputs.as_floats(op, names[0], x, 2, vectors=True, arithmetic=arithmetic)
    y_t = _inputs.as_floats(op, names[1], y, 2, device=x_t.device, vectors=True, arithmetic=arithmetic)
    if x_t.shape[1] != y_t.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same feature dimension, got {x_t.shape[1]} and {y_t.shape[1]}"
        )
    if metric != "cosine":
        check_euclidean_scale(op, arithmetic or compute_dtype(x_t, y_t), **{names[0]: x_t, names[1]: y_t})
    return x_t, y_t


def _operands(x_t, y_t, metric):
    dtype = compute_dtype(x_t, y_t)
    return _Operand(x_t, metric, dtype), _Operand(y_t, metric, dtype)


def pairwise_distance(x, y, metric: str = "euclidean"):
    """(M, N) distances between the rows of x (M, D) and y (N, D); numpy in, numpy out.

    Computed in row tiles written straight into the output, so calling it on tiles of x
    gives a tiled result with no extra temporaries.
    """
    return named_pairwise_distance(x, y, metric, ("x", "y"))


def named_pairwise_distance(x, y, metric: str, names: tuple):
    """pairwise_distance whose messages call x and y `names` (the compat drop-ins' argument names)."""
    x_t, y_t = _check_tensors("pairwise_distance", x, y, metric, names)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, y)):
        return _differentiable_distance(x, y, x_t, y_t, metric)
    xs, ys = _operands(x_t, y_t, metric)
    out = torch.empty(len(xs.features), len(ys.features), dtype=xs.features.dtype, device=xs.features.device)
    for start in range(0, len(out), TILE_ROWS):
        tile = out[start : start + TILE_ROWS]
        raw_distance(*xs.rows(start, start + TILE_ROWS), ys.features, ys.squared_norms, metric, out=tile)
        finish_distance(tile, metric)
    return _inputs.like_input(out, x)


def _differentiable_distance(x, y, x_t, y_t, metric: str) -> torch.Tensor:
    """The same GEMM formula on autograd's graph, for a tensor that requires grad (torchreid's distances are plain
    torch: a distance-based loss trains through them; the tiled path gave a result without a graph). ``x_t`` /
    ``y_t``: the checked, detached stand-ins of an input that does not."""
    dtype = compute_dtype(x_t, y_t)
    x = (x if isinstance(x, torch.Tensor) else x_t).to(dtype)
    y = (y if isinstance(y, torch.Tensor) else y_t).to(device=x.device, dtype=dtype)
    if metric == "cosine":
        return 1 - F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    squared = ((x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2 * x @ y.T).clamp_min(0)
    return squared if metric == "sqeuclidean" else sqrt_flat_at_zero(squared)


def knn(x, y, k: int, metric: str = "euclidean", strategy: str = "auto"):
    """The k nearest rows of y for every row of x: (distances, indices), both (M, k), sorted.

    Runs the fused op dpm_ops.ops.knn where the C++/CUDA kernels are available (on CUDA for
    k <= 256, its lists' size), else a tiled torch path with the same results.

    Ties are broken by (distance, index) exactly: among equal distances the lower y index
    comes first, as a stable sort of the full distance row would give. Distances are computed
    tile by tile and merged into running top-k lists, so memory stays O(M k + tile) whatever N.

    ``strategy``: the fused op's ("auto" | "certified" | "direct", see dpm_ops.ops.knn): "auto" runs
    the certified two-stage search where it is faster; the tiled torch path is the direct one.
    """
    x_t, y_t = _check_tensors("knn", x, y, metric)
    check_strategy(strategy)
    num_y = len(y_t)
    k = _inputs.check_count("k", k, 1)
    if k > num_y:
        raise ValueError(f"k must be <= the number of rows of y ({num_y}), got {k}")
    # The certified search is the fused op's (which refuses it where no kernel runs it); the CUDA
    # kernel's lists hold k <= KNN_GPU_MAX_K, past that the tiled path below runs on the GPU.
    backend = _backend.resolve(None, x_t.device)
    if strategy == "certified" or backend == "cpp" or (backend == "cuda" and k <= KNN_GPU_MAX_K):
        # The fused op (dpm_ops.ops.knn): GEMM tiles merged into per-row sorted lists in C++/CUDA.
        distances, indices = knn_op(x_t, y_t, k, metric, strategy=strategy)
        return _inputs.like_input(distances, x), _inputs.like_input(indices, x)
    xs, ys = _operands(x_t, y_t, metric)
    distances, indices = [], []
    for start in range(0, len(xs.features), TILE_ROWS):
        x_tile, x_norms = xs.rows(start, start + TILE_ROWS)
        nearest = RunningSmallest(len(x_tile), min(k + TIE_MARGIN, num_y), x_tile.dtype, x_tile.device)
        for column in range(0, num_y, TILE_COLUMNS):
            y_tile, y_norms = ys.rows(column, column + TILE_COLUMNS)
            nearest.offer(0, len(x_tile), raw_distance(x_tile, x_norms, y_tile, y_norms, metric), column)

        def full_rows(rows, x_tile=x_tile, x_norms=x_norms):
            return finish_distance(
                raw_distance(x_tile[rows], x_norms[rows], ys.features, ys.squared_norms, metric), metric
            )

        values, position = resolve_smallest(
            nearest.values, nearest.indices, k, num_y, lambda raw, rows: finish_distance(raw.clone(), metric), full_rows
        )
        distances.append(values)
        indices.append(position)
    return (_inputs.like_input(torch.cat(distances), x), _inputs.like_input(torch.cat(indices), x))
