"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the "ranklist" reference semantics.

Both entry points run the same sparse pipeline (dpm_ops/ops/kreciprocal_reference.py) and differ only in where the
pooled distance d(i, j), i, j in queries + gallery (queries first, N = Q + G), comes from:

* `re_ranking(q_g_dist, q_q_dist, g_g_dist)`: the three matrices the reference takes;
* `rerank_features(qf, gf)`: Euclidean distances of the features, computed tile by tile and
  never stored beyond the (Q, G) output.

Reference semantics reproduced (Zhong et al.'s CVPR 2017 code, ``re_ranking``): Euclidean input squared inside,
float32, every row divided by its maximum over all N items (queries included), k-reciprocal
sets on the first k1 + 1 neighbours, expansion with kh = round-half-even(k1 / 2) and the
strict 2/3 test, Gaussian weights normalised per row, query expansion over the k2 nearest
(self included, skipped when k2 == 1), Jaccard over all N columns, blend with the normalised
distance.

Which entry is item i's distance to item j: the reference divides the pooled matrix by its
column maxima and transposes it, so item i reads *column* i, d(i, j) = pooled[j, i]. For
symmetric q_q / g_g that is row i; for asymmetric ones (DPM's query-masked distance) it is not,
and `re_ranking(orientation="reference")`, the default, reads columns exactly as the reference
does, while `orientation="rows"` reads d(i, j) = pooled[i, j] (q_q[i, j], g_g[i, j]). The
q-g block is read the same way by both: the reference pools q_g above and its transpose below.

Ties: ranks order equal distances by item index (queries first), as a stable argsort does.
The reference (and torchreid / fast-reid) rank with numpy's default argsort, which is not
stable: its order among exactly equal distances depends on the machine and the numpy build
(numpy 2.4's SIMD sort turns [1, 1, 0, 0] into [3, 2, 1, 0] on an AVX-512 CPU), so exact ties
are the one place where results may differ from theirs.
"""

import functools

import torch

from .. import _backend
from .._precision import compute_dtype
from ..ops._checks import KNN_GPU_MAX_K, check_euclidean_scale, row_norm_limit
from ..ops.knn import check_certified_runs, check_strategy, self_knn
from ..ops.knn_certified import raw_neighbours
from ..ops.kreciprocal import (
    KRECIPROCAL_EXPAND,
    KRECIPROCAL_JACCARD_BLEND_,
    KRECIPROCAL_PAIR_SQDIST,
    KRECIPROCAL_QUERY_EXPANSION,
)
from . import _inputs
from ._copies import copy_groups, tie_copies, zero_copies
from ._inputs import check_rerank_parameters
from ..ops.kreciprocal_reference import (
    csr_rows,
    encode_weights,
    expanded_neighbourhoods,
    jaccard_blend_,
    pair_sqdist,
    query_expansion,
    softmax_weights,
)
from ._select import TIE_MARGIN, RunningSmallest, resolve_smallest, smallest_in_rows
from .distance import _check_tensors, raw_distance

INPUTS = ("euclidean", "squared")
ORIENTATIONS = ("reference", "rows")
_ROW_BLOCK_ELEMENTS = 1 << 23
_FEATURE_TILE = 2048
_PAIR_CHUNK = 1 << 16


def _row_scale(row_max: torch.Tensor) -> torch.Tensor:
    """What each row is divided by: its maximum, or 1 where that is 0 (every distance of the row
    is 0, e.g. identical features), where the reference's 0 / 0 would make every result NaN."""
    return torch.where(row_max > 0, row_max, torch.ones_like(row_max))


class _DenseDistances:
    """Pooled distances read from the q_g, q_q and g_g matrices, one block of rows at a time."""

    def __init__(self, q_g, q_q, g_g, squared_input: bool):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_query, num_gallery = q_g.shape
        self.num_items = self.num_query + num_gallery
        self.squared_input = squared_input
        self.dtype = _squaring_dtype(q_g, q_q, g_g)
        self.row_max = None
        self.out_scale = None  # scan returns the query-gallery block already normalised

    def _squared(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.dtype)
        return (values if self.squared_input else values * values).to(torch.float32)

    def _pooled_rows(self, start: int, stop: int) -> torch.Tensor:
        q = self.num_query
        blocks = []
        if start < q:
            blocks.append(torch.cat([self.q_q[start : min(stop, q)], self.q_g[start : min(stop, q)]], dim=1))
        if stop > q:
            begin = max(start, q) - q
            blocks.append(torch.cat([self.q_g[:, begin : stop - q].T, self.g_g[begin : stop - q]], dim=1))
        return self._squared(torch.cat(blocks))

    def scan(self, width: int):
        """(neighbours (N, width), normalised query-gallery distance (Q, G))."""
        n, q = self.num_items, self.num_query
        neighbours = torch.empty(n, width, dtype=torch.long, device=self.q_g.device)
        self.row_max = torch.empty(n, dtype=torch.float32, device=self.q_g.device)
        out = torch.empty(q, n - q, dtype=torch.float32, device=self.q_g.device)
        step = max(1, _ROW_BLOCK_ELEMENTS // n)
        for start in range(0, n, step):
            stop = min(start + step, n)
            block = self._pooled_rows(start, stop)
            self.row_max[start:stop] = _row_scale(block.amax(dim=1))
            block /= self.row_max[start:stop, None]
            values, indices = smallest_in_rows(block, width + TIE_MARGIN)
            neighbours[start:stop] = resolve_smallest(
                values, indices, width, n, lambda v, rows: v, lambda rows: block[rows]
            )[1]
            if start < q:
                out[start : min(stop, q)] = block[: min(stop, q) - start, q:]
        return neighbours, out

    def csr_pair_distances(self, backend: str, row_ptr, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """pair_distances of the entries of a CSR set: lookups in the matrices, on any backend."""
        return self.pair_distances(rows, cols)

    def pair_distances(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        q = self.num_query
        values = torch.empty(len(rows), dtype=self.dtype, device=rows.device)
        row_query, col_query = rows < q, cols < q
        for mask, matrix, r, c in (
            (row_query & col_query, self.q_q, rows, cols),
            (row_query & ~col_query, self.q_g, rows, cols - q),
            (~row_query & col_query, self.q_g, cols, rows - q),  # g-q block is q_g transposed
            (~row_query & ~col_query, self.g_g, rows - q, cols - q),
        ):
            values[mask] = matrix[r[mask], c[mask]].to(values.dtype)
        return self._squared(values) / self.row_max[rows]


class _Candidates:
    """Each row's nearest items (indices) and their squared distances (values), in any order."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor):
        self.values, self.indices = values, indices


class _FeatureDistances:
    """Pooled squared Euclidean distances of features, computed in square tiles of the upper
    triangle (the matrix is symmetric, so each tile serves its rows and, transposed, its
    columns). The distance of an item to itself, and between exact copies (_copies.py), is set to 0, as
    scipy's cdist gives, so GEMM rounding never lets a near-duplicate outrank the item or its copies."""

    def __init__(self, qf: torch.Tensor, gf: torch.Tensor, strategy: str = "auto"):
        dtype = compute_dtype(qf, gf)
        self.strategy = strategy
        self.features = torch.cat([qf.to(dtype), gf.to(dtype)]).contiguous()
        self.num_query = len(qf)
        self.num_items = len(self.features)
        self.row_max = None
        self.nearest = None
        self.out_scale = None  # set by the kernel scan: its query-gallery block is not yet normalised

    @functools.cached_property
    def copies(self):
        return copy_groups(self.features)

    @functools.cached_property
    def norms(self) -> torch.Tensor:
        """Squared row norms (the torch scan and pair_distances; the fused kernels take their own)."""
        return (self.features * self.features).sum(dim=1)

    def _tile(self, row_start, row_stop, col_start, col_stop) -> torch.Tensor:
        x, y = self.features, self.norms
        block = raw_distance(
            x[row_start:row_stop], y[row_start:row_stop], x[col_start:col_stop], y[col_start:col_stop], "sqeuclidean"
        ).to(torch.float32)
        if row_start == col_start:
            block.fill_diagonal_(0.0)
        return zero_copies(block, self.copies, slice(row_start, row_stop), slice(col_start, col_stop))

    def _full_rows(self, rows: torch.Tensor) -> torch.Tensor:
        x, y = self.features, self.norms
        block = raw_distance(x[rows], y[rows], x, y, "sqeuclidean").to(torch.float32)
        block[torch.arange(len(rows), device=rows.device), rows] = 0.0
        return zero_copies(block, self.copies, rows, slice(None)) / self.row_max[rows, None]

    def _kernel_scans(self, width: int) -> bool:
        """Whether self_knn's kernels take the scan: not on the reference backend, nor where the direct
        GPU kernels' lists (KNN_GPU_MAX_K) cannot hold the raw neighbours of its normalised order
        (k1 >= 248 or k2 >= 249 for N > 256); the torch tile scan below then runs, on any device."""
        backend = _backend.resolve(None, self.features.device)
        if self.strategy == "certified" or backend == "cpp":
            return True
        keep = min(width + TIE_MARGIN, self.num_items)
        return backend != "reference" and raw_neighbours(self.num_items, keep, normalize=True) <= KNN_GPU_MAX_K

    def scan(self, width: int):
        if self._kernel_scans(width):
            return self._scan_kernel(width)
        n, q = self.num_items, self.num_query
        device = self.features.device
        self.nearest = RunningSmallest(n, min(width + TIE_MARGIN, n), torch.float32, device)
        self.row_max = torch.zeros(n, dtype=torch.float32, device=device)
        out = torch.empty(q, n - q, dtype=torch.float32, device=device)
        starts = range(0, n, _FEATURE_TILE)
        # Diagonal tiles first: every row then holds candidates (from its own tile, where
        # re-ID data ordered by identity keeps most neighbours) before any tile is offered
        # transposed, so all later offers take the cheap threshold path.
        tiles = [(start, start) for start in starts] + [(r, c) for r in starts for c in starts if c > r]
        for row_start, col_start in tiles:
            row_stop, col_stop = min(row_start + _FEATURE_TILE, n), min(col_start + _FEATURE_TILE, n)
            block = self._tile(row_start, row_stop, col_start, col_stop)
            if row_start < q and col_stop > q:
                query_stop, gallery_start = min(row_stop, q), max(col_start, q)
                out[row_start:query_stop, gallery_start - q : col_stop - q] = block[
                    : query_stop - row_start, gallery_start - col_start :
                ]
            torch.maximum(self.row_max[row_start:row_stop], block.amax(dim=1), out=self.row_max[row_start:row_stop])
            self.nearest.offer(row_start, row_stop, block, col_start)
            if col_start != row_start:
                torch.maximum(self.row_max[col_start:col_stop], block.amax(dim=0), out=self.row_max[col_start:col_stop])
                self.nearest.offer(col_start, col_stop, block, row_start, transposed=True)

        self.row_max = _row_scale(self.row_max)
        neighbours = resolve_smallest(
            self.nearest.values,
            self.nearest.indices,
            width,
            n,
            lambda values, rows: values / self.row_max[rows, None],
            self._full_rows,
        )[1]
        out /= self.row_max[:q, None]
        return neighbours, out

    def _scan_kernel(self, width: int):
        """The same scan as one fused op (dpm_ops.ops.self_knn: on the CPU upper-triangle GEMM tiles,
        each offered to its rows and columns; on CUDA cuBLAS row blocks, on Triton fused distance tiles,
        every row in full), exact
        (value / row max, index) order, the row maxima and the query-gallery block; keeps width +
        TIE_MARGIN candidates for pair_distances."""
        n, q = self.num_items, self.num_query
        values, indices, row_max, cross = self_knn(
            self.features,
            min(width + TIE_MARGIN, n),
            "sqeuclidean",
            normalize=True,
            cross_rows=q,
            strategy=self.strategy,
        )
        self.row_max = _row_scale(row_max.to(torch.float32))
        values = values.to(torch.float32)
        tie_copies(values, indices, self.copies)
        self.nearest = _Candidates(values, indices)
        self.out_scale = self.row_max[:q]  # the Jaccard kernel divides by it in its own pass
        cross = zero_copies(cross.to(torch.float32), self.copies, slice(0, q), slice(q, n))
        return indices[:, :width].contiguous(), cross

    def csr_pair_squared(self, backend: str, row_ptr, cols: torch.Tensor) -> torch.Tensor:
        """Squared distances (float32) of the entries of a CSR set, in one call of `backend`'s kernel
        (lookups in the scan's candidates, else from the features)."""
        return KRECIPROCAL_PAIR_SQDIST.run(
            backend, self.features, self.nearest.values, self.nearest.indices, row_ptr, cols
        )

    def csr_pair_distances(self, backend: str, row_ptr, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """pair_distances of the entries of a CSR set, in one call of `backend`'s kernel."""
        return zero_copies(self.csr_pair_squared(backend, row_ptr, cols), self.copies, rows, cols) / self.row_max[rows]

    def pair_distances(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """d(i, j) / max_j' d(i, j') for pairs of items."""
        squared = torch.empty(len(rows), dtype=torch.float32, device=rows.device)
        for start in range(0, len(rows), _PAIR_CHUNK):
            squared[start : start + _PAIR_CHUNK] = pair_sqdist(
                self.features,
                self.norms,
                self.nearest.values,
                self.nearest.indices,
                rows[start : start + _PAIR_CHUNK],
                cols[start : start + _PAIR_CHUNK],
            )
        return zero_copies(squared, self.copies, rows, cols) / self.row_max[rows]


def _squaring_dtype(*matrices: torch.Tensor) -> torch.dtype:
    """The dtype the reference squares the pooled matrix in: numpy's promotion of the three
    (np.concatenate), then float32. So float16 matrices are squared in float16, as the reference
    does (float32 input gives the more accurate result); bfloat16, which numpy lacks, in float32."""
    dtype = functools.reduce(torch.promote_types, (m.dtype for m in matrices))
    return torch.float16 if dtype == torch.float16 else compute_dtype(dtype)


def _check_distance_range(input: str, **matrices) -> None:
    """Squared distances must be >= 0 (a negative one has no Euclidean meaning and breaks the row
    normalisation), and every distance small enough to be squared in the dtype the reference squares
    it in (_squaring_dtype) and to stay in range in the float32 pipeline, and not all so small that their
    squares fall among that dtype's subnormals (the re-ranked distances were then rounding noise, up to 0.9
    off, without a word): one device sync."""
    squaring = _squaring_dtype(*matrices.values())
    squares = torch.float16 if input == "euclidean" and squaring == torch.float16 else torch.float32
    if squares == torch.float16:
        limit, where = (
            torch.finfo(torch.float16).max ** 0.5,
            "float16 matrices are squared in float16, as the reference does",
        )
    else:
        limit, where = row_norm_limit(torch.float32), "the range of the float32 pipeline"
    bounds = torch.stack([torch.stack(torch.aminmax(m)).double() for m in matrices.values()]).tolist()
    for (name, _), (low, high) in zip(matrices.items(), bounds):
        if input == "squared" and low < 0:
            raise ValueError(f"re_ranking: {name} must hold squared distances >= 0 (input='squared'), got {low:g}")
        if max(high, -low) > limit:
            raise ValueError(
                f"re_ranking: {name} is too large in magnitude: distances must stay below {limit:.5g} ({where})"
            )
    floor = torch.finfo(squares).tiny ** (0.5 if input == "euclidean" else 1)
    if 0 < max(max(high, -low) for low, high in bounds) < floor:
        raise ValueError(
            f"re_ranking: {', '.join(matrices)} are too small in magnitude: the largest distance must be 0 or "
            f"at least {floor:.3g}: below, their {str(squares).removeprefix('torch.')} squares are subnormal "
            "(scale the distances)"
        )


def _rerank_kernels(source, neighbours, out, k1: int, k2: int, lambda_value: float, backend: str) -> torch.Tensor:
    """The sparse stages as the C++ or CUDA kernels of `backend` (csrc/kreciprocal/), on CSR sets: same
    maths and float order as the torch stages."""
    n = source.num_items
    row_ptr, cols = KRECIPROCAL_EXPAND.run(backend, neighbours, k1, round(k1 / 2))
    rows = torch.repeat_interleave(torch.arange(n, device=cols.device), row_ptr.diff())
    weights = encode_weights(rows, source.csr_pair_distances(backend, row_ptr, rows, cols), n)
    if k2 != 1:
        row_ptr, cols, weights = KRECIPROCAL_QUERY_EXPANSION.run(
            backend, row_ptr, cols, weights, neighbours[:, :k2].contiguous()
        )
    KRECIPROCAL_JACCARD_BLEND_.run(backend, out, row_ptr, cols, weights, lambda_value, source.out_scale)
    return out


def _rerank(source, k1: int, k2: int, lambda_value: float) -> torch.Tensor:
    n = source.num_items
    neighbours, out = source.scan(min(max(k1 + 1, k2), n))
    # The torch stages remain for builds without the extension (or without CUDA, on GPU tensors).
    backend = _backend.resolve(None, neighbours.device)
    if backend in ("cpp", "cuda"):
        return _rerank_kernels(source, neighbours, out, k1, k2, lambda_value, backend)
    if source.out_scale is not None:
        out.div_(source.out_scale[:, None])
    rows, cols = expanded_neighbourhoods(neighbours, k1, round(k1 / 2))  # round() is half-to-even, as np.around
    weights = encode_weights(rows, source.pair_distances(rows, cols), n)
    if k2 != 1:
        rows, cols, weights = query_expansion(rows, cols, weights, neighbours[:, :k2], n)
    return jaccard_blend_(out, rows, cols, weights, lambda_value)


def re_ranking(
    q_g_dist,
    q_q_dist,
    g_g_dist,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    input: str = "euclidean",
    orientation: str = "reference",
):
    """k-reciprocal re-ranked (Q, G) float32 distances from q_g (Q, G), q_q (Q, Q), g_g (G, G).

    input="euclidean": the matrices hold Euclidean distances and are squared inside, as the
    reference does. input="squared": they hold squared Euclidean distances, used as they are
    (the same result, without the square). torchreid's engine passes squared distances to the
    reference, which squares them again; `input="euclidean"` on such matrices reproduces that.

    orientation (matters only for asymmetric q_q / g_g): "reference" reads item i's distances
    from column i of q_q / g_g and normalises by the column maximum, as the reference's column
    max and transpose do (what torchreid / fast-reid users get); "rows" reads row i,
    d(i, j) = q_q[i, j], so an item's neighbourhood comes from its own row (for DPM's
    query-masked distance: ranked under the item's own mask). `orientation="rows"` on
    (q_g, q_q.T, g_g.T) equals the default on (q_g, q_q, g_g).
    numpy in, numpy out; torch in, torch out on the same device.
    """
    k1, k2, lambda_value = check_rerank_parameters(k1, k2, lambda_value)
    _inputs.check_choice("input", input, INPUTS)
    _inputs.check_choice("orientation", orientation, ORIENTATIONS)
    q_g = _inputs.as_floats("re_ranking", "q_g_dist", q_g_dist, 2)
    num_query, num_gallery = q_g.shape
    q_q = _inputs.as_floats("re_ranking", "q_q_dist", q_q_dist, 2, device=q_g.device)
    g_g = _inputs.as_floats("re_ranking", "g_g_dist", g_g_dist, 2, device=q_g.device)
    if q_q.shape != (num_query, num_query):
        raise ValueError(f"q_q_dist must be ({num_query}, {num_query}) for {num_query} queries, got {tuple(q_q.shape)}")
    if g_g.shape != (num_gallery, num_gallery):
        raise ValueError(
            f"g_g_dist must be ({num_gallery}, {num_gallery}) for {num_gallery} gallery items, got {tuple(g_g.shape)}"
        )
    _check_distance_range(input, q_g_dist=q_g, q_q_dist=q_q, g_g_dist=g_g)
    if orientation == "reference":
        q_q, g_g = q_q.T, g_g.T  # strided views: rows are read a block at a time and copied anyway
    source = _DenseDistances(q_g, q_q, g_g, squared_input=input == "squared")
    return _inputs.like_input(_rerank(source, k1, k2, lambda_value), q_g_dist)


def jaccard_distance(features, k1: int = 20, k2: int = 6, num_query: int | None = None, strategy: str = "auto"):
    """The k-reciprocal Jaccard distance between the rows of ``features`` (N, D): fast-reid's and
    OpenUnReID's ``compute_jaccard_distance``, the distance that unsupervised re-ID pipelines
    (SpCL, cluster contrast) cluster with. (N, N) float32, or with ``num_query`` = Q only the
    (Q, N - Q) block of the first Q rows against the others (fast-reid's
    ``build_dist(q, g, "jaccard")``), computed without the N x N weight matrix.

    Their semantics: each item's k1 nearest items by squared Euclidean distance, itself included
    (d(i, i) = 0 exactly), as its neighbourhood; k-reciprocal sets expanded with the
    round-half-even(k1 / 2) sets under the strict 2/3 test; weights softmax(-d²) over each set
    (un-normalised squared distances); query expansion over the min(k1, k2) nearest (their search
    returns k1; skipped when k2 == 1); Jaccard 1 - m / (2 - m), m = sum_k min(V[i, k], V[j, k]),
    negatives set to 0. Exact: their
    faiss search's ties and rounding aside, the same neighbourhoods (ties by (distance, index)),
    values within float32 summation order. ``strategy``: the neighbour search's, as for
    dpm_ops.ops.self_knn. numpy in, numpy out; torch in, torch out on the same device.
    """
    k1 = _inputs.check_k("k1", k1, 2)  # k1 nearest, the item itself one of them
    k2 = _inputs.check_k("k2", k2, 1)
    check_strategy(strategy, "jaccard_distance")
    x = _inputs.as_floats("jaccard_distance", "features", features, 2, vectors=True, arithmetic=torch.float32)
    check_euclidean_scale("jaccard_distance", torch.float32, features=x)
    check_certified_runs(strategy, _backend.resolve(None, x.device), "jaccard_distance")
    n = len(x)
    if n < 2:
        raise ValueError(f"features must have at least 2 rows, got {n}")
    full = num_query is None
    q = n if full else _inputs.check_count("num_query", num_query, 1, n - 1)
    out = _square_result(n, x.device) if full else None  # before the search: past memory, at once
    source = _FeatureDistances(x[:q], x[q:], strategy)
    # their search returns k1 neighbours, all that is used; the scan's (Q, G) distance block is not
    neighbours, cross = source.scan(min(k1, n))
    backend = _backend.resolve(None, neighbours.device)
    stages = backend if backend in ("cpp", "cuda") else "reference"
    # their forward set is the first k1 neighbours (self included): this pipeline's N(i, k1 - 1)
    row_ptr, cols = KRECIPROCAL_EXPAND.run(stages, neighbours, min(k1, n) - 1, round(k1 / 2))
    weights = softmax_weights(csr_rows(row_ptr), source.csr_pair_squared(stages, row_ptr, cols), n)
    if k2 != 1:
        row_ptr, cols, weights = KRECIPROCAL_QUERY_EXPANSION.run(
            stages,
            row_ptr,
            cols,
            weights,
            neighbours[:, :k2].contiguous(),  # k2 > k1: their k1 columns
        )
    if full:  # every item against every item: the sets once as the "query" rows, once as the "gallery" rows
        row_ptr = torch.cat([row_ptr, row_ptr[1:] + len(cols)])
        cols, weights = torch.cat([cols, cols]), torch.cat([weights, weights])
    # the (Q, G) result takes the unused distance block's memory
    out = out.zero_() if full else cross.contiguous().zero_()
    KRECIPROCAL_JACCARD_BLEND_.run(stages, out, row_ptr, cols, weights, 0.0)
    return _inputs.like_input(out.clamp_min_(0.0), features)


def _square_result(n: int, device) -> torch.Tensor:
    """jaccard_distance's (N, N) float32 result, uninitialised; a MemoryError that says so where it does not fit."""
    try:
        return torch.empty(n, n, dtype=torch.float32, device=device)
    except RuntimeError as error:  # torch's allocation failure (its OutOfMemoryError on CUDA is one)
        raise MemoryError(
            f"jaccard_distance: the ({n}, {n}) float32 result needs {n * n * 4 / 2**30:.1f} GiB, more than "
            f"{device} can give; num_query=Q computes the (Q, N - Q) block only"
        ) from error


def rerank_features(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, strategy: str = "auto"):
    """`re_ranking` of the Euclidean distances of query features qf (Q, D) and gallery
    features gf (G, D), without ever holding an N x N matrix.

    One pass over tiles of the pooled distance matrix collects each row's maximum, its
    max(k1 + 1, k2) nearest items and the query-gallery block of the output; the rest works
    on sparse neighbour lists. Memory: the (Q, G) float32 output, O(N (k1 + k2)) lists and
    fixed-size tiles. Equal to `re_ranking` on the Euclidean distances of the same features
    (up to float rounding, <= 1e-5) wherever no exact tie decides a neighbourhood; ties are
    broken by (distance, index), queries before gallery, and d(i, i) is exactly 0, as is the distance
    between exact copies (equal rows), as scipy's cdist gives them: the GEMM formula leaves copies a
    rounding residue apart, which ranked an item before its copies (_copies.py).
    ``strategy``: the neighbour search's, as for dpm_ops.ops.self_knn ("auto" | "certified" |
    "direct"; "certified": the C++ CPU, CUDA and Triton backends).
    """
    k1, k2, lambda_value = check_rerank_parameters(k1, k2, lambda_value)
    check_strategy(strategy, "rerank_features")
    # The pipeline is float32 (as the reference) whatever the features' dtype.
    query, gallery = _check_tensors("rerank_features", qf, gf, "euclidean", ("qf", "gf"), arithmetic=torch.float32)
    check_certified_runs(strategy, _backend.resolve(None, query.device), "rerank_features")
    source = _FeatureDistances(query, gallery, strategy)
    return _inputs.like_input(_rerank(source, k1, k2, lambda_value), qf)
