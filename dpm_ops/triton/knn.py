"""Triton kernel of the fused distance + top-k (maths and tie rule: dpm_ops/ops/knn_reference.py).

One program per BLOCK_M rows of x (_list_rows; fewer where the grid would leave multiprocessors
idle: _device.rows_per_program) streams y in BLOCK_N-column tiles: a distance tile from tl.dot
(fp32 IEEE or TF32 by torch's matmul precision, fp64: triton/_precision.py), then the tile's pairs
that beat a row's worst kept one go into the rows' K kept pairs, held in registers (offer_tile, also
used by knn_certified.py), sorted once at the end. The (M, N) matrix is never written; the output
is written once. The register lists cap k at 256, as the CUDA kernel's shared memory.

The same kernel is self_knn's (SELF: x against itself): it also sets d(i, i) = 0, keeps each row's
maximum and writes the block d[:Q, Q:] (re-ranking's query x gallery distances) from its tiles.
"""

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._precision import compute_dtype
from ..ops._checks import KNN_GPU_MAX_K, check_knn_gpu_k
from ..ops.knn_certified import TIE_MARGIN, normalized_order, raw_neighbours
from ..ops.knn_reference import COSINE_EPS, pairwise_distance_reference
from ._device import on_input_device, rows_per_program
from ._precision import COMPILE_OPTIONS, dot, dot_precision, sqrt_rn

# Tiles chosen with the static check (scripts/static_check), with Triton 3.6's and 3.9's ptxas.
BLOCK_N = 64
BLOCK_D = 16
# Above every column and every placeholder (empty_lists): a pair taken out of a tile never beats a kept
# one (int32 lists: half the registers).
_NO_INDEX = 2**31 - 1
_METRIC_IDS = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2}


@triton.jit
def _lexicographic_min(values, indices, NO_INDEX: tl.constexpr):
    """Per row: the smallest value and, among equal ones, the smallest index."""
    v = tl.min(values, axis=1)
    i = tl.min(tl.where(values == v[:, None], indices, NO_INDEX), axis=1)
    return v, i


@triton.jit
def _lexicographic_max(values, indices, live):
    """Per row: the largest (value, index) pair among the live slots."""
    v = tl.max(tl.where(live, values, float("-inf")), axis=1)
    i = tl.max(tl.where(live & (values == v[:, None]), indices, -1), axis=1)
    return v, i


@triton.jit
def empty_lists(BLOCK_M: tl.constexpr, K, KP: tl.constexpr, dtype: tl.constexpr, NO_INDEX: tl.constexpr):
    """The rows' lists of K kept (value, index) pairs in KP slots, unsorted, and each row's worst kept
    pair. The K live slots start as (inf, NO_INDEX - KP + slot): distinct placeholders that every
    column's pair beats; the slots past K hold (inf, NO_INDEX) and never change."""
    slots = tl.arange(0, KP)
    live = (slots < K)[None, :] & tl.full((BLOCK_M, KP), 1, tl.int1)
    best_v = tl.full((BLOCK_M, KP), float("inf"), dtype)
    best_i = tl.where(live, NO_INDEX - KP + slots[None, :], NO_INDEX)
    worst_v, worst_i = _lexicographic_max(best_v, best_i, live)
    return best_v, best_i, worst_v, worst_i, live


@triton.jit
def offer_tile(dist, tile_i, best_v, best_i, worst_v, worst_i, live, K, NO_INDEX: tl.constexpr):
    """Keeps the rows' K smallest (value, index) pairs of the lists and a tile. Each round, every row
    whose smallest remaining tile pair beats its worst kept pair puts it in the worst one's slot; the
    rounds stop when no row takes one. So a tile costs as many rounds as the most any of its rows
    takes (at most K; a tile no row takes from costs one comparison), where a full merge cost K.
    Taken pairs leave the tile as (inf, NO_INDEX), which never beats a kept pair."""
    tv, ti = _lexicographic_min(dist, tile_i, NO_INDEX)
    take = (tv < worst_v) | ((tv == worst_v) & (ti < worst_i))
    any_take = tl.max(take.to(tl.int32), axis=0)
    for _ in range(0, K):
        if any_take > 0:
            into = take[:, None] & (best_i == worst_i[:, None])
            best_v = tl.where(into, tv[:, None], best_v)
            best_i = tl.where(into, ti[:, None], best_i)
            taken = take[:, None] & (tile_i == ti[:, None])
            dist = tl.where(taken, float("inf"), dist)
            tile_i = tl.where(taken, NO_INDEX, tile_i)
            worst_v, worst_i = _lexicographic_max(best_v, best_i, live)
            tv, ti = _lexicographic_min(dist, tile_i, NO_INDEX)
            take = (tv < worst_v) | ((tv == worst_v) & (ti < worst_i))
            any_take = tl.max(take.to(tl.int32), axis=0)
    return best_v, best_i, worst_v, worst_i


@triton.jit
def _sorted_lists(best_v, best_i, K, KP: tl.constexpr, NO_INDEX: tl.constexpr):
    """The lists in (value, index) order: K rounds, each moving the smallest remaining pair out."""
    slots = tl.arange(0, KP)
    out_v = tl.full(best_v.shape, float("inf"), best_v.dtype)
    out_i = tl.full(best_i.shape, NO_INDEX, tl.int32)
    for t in range(0, K):
        v, i = _lexicographic_min(best_v, best_i, NO_INDEX)
        here = slots[None, :] == t
        out_v = tl.where(here, v[:, None], out_v)
        out_i = tl.where(here, i[:, None], out_i)
        moved = best_i == i[:, None]
        best_v = tl.where(moved, float("inf"), best_v)
        best_i = tl.where(moved, NO_INDEX, best_i)
    return out_v, out_i


@triton.jit
def _self_tile(dist, rows, cols, in_m, in_n, top, cross_ptr, N, Q):
    """self_knn's part of a distance tile: d(i, i) = 0 exactly, the rows' running maxima, and the
    tile's share of the block d[:Q, Q:] (the query x gallery distances re-ranking blends in)."""
    dist = tl.where(rows[:, None] == cols[None, :], 0.0, dist)
    top = tl.maximum(top, tl.max(tl.where(in_n[None, :], dist, 0.0), axis=1))
    if (tl.min(rows) < Q) & (tl.max(cols) >= Q):  # a tile of the block
        in_cross = (in_m & (rows < Q))[:, None] & (in_n & (cols >= Q))[None, :]
        offs = rows[:, None].to(tl.int64) * (N - Q) + (cols[None, :] - Q)
        tl.store(cross_ptr + offs, dist, mask=in_cross)
    return dist, top


@triton.jit
def _knn_kernel(
    x_ptr,
    y_ptr,
    xn_ptr,
    yn_ptr,
    out_v_ptr,
    out_i_ptr,
    row_max_ptr,
    cross_ptr,
    M,
    N,
    D,
    K,
    Q,
    METRIC: tl.constexpr,
    SELF: tl.constexpr,
    KP: tl.constexpr,
    NO_INDEX: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = rows < M
    acc_t = xn_ptr.dtype.element_ty
    x_norm = tl.load(xn_ptr + rows, mask=in_m, other=0.0)
    best_v, best_i, worst_v, worst_i, live = empty_lists(BLOCK_M, K, KP, acc_t, NO_INDEX)
    top = tl.zeros((BLOCK_M,), acc_t)  # SELF: the row maxima (d(i, i) = 0 is one of the row's distances)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        in_n = cols < N
        dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            in_d = d < D
            xt = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * D + d[None, :], mask=in_m[:, None] & in_d[None, :], other=0.0
            )
            yt = tl.load(
                y_ptr + cols[:, None].to(tl.int64) * D + d[None, :], mask=in_n[:, None] & in_d[None, :], other=0.0
            )
            dots = dot(xt, tl.trans(yt), dots, PRECISION, acc_t)
        if METRIC == 2:
            dist = 1.0 - dots
        else:
            y_norm = tl.load(yn_ptr + cols, mask=in_n, other=0.0)
            dist = tl.maximum(x_norm[:, None] + y_norm[None, :] - 2.0 * dots, 0.0)
            if METRIC == 0:
                dist = sqrt_rn(dist)
        if SELF:
            dist, top = _self_tile(dist, rows, cols, in_m, in_n, top, cross_ptr, N, Q)
        dist = tl.where(in_n[None, :], dist, float("inf"))
        tile_i = tl.where(in_n[None, :], cols[None, :], NO_INDEX) + tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        best_v, best_i, worst_v, worst_i = offer_tile(dist, tile_i, best_v, best_i, worst_v, worst_i, live, K, NO_INDEX)
    best_v, best_i = _sorted_lists(best_v, best_i, K, KP, NO_INDEX)
    slots = tl.arange(0, KP)
    offs = rows[:, None].to(tl.int64) * K + slots[None, :]
    out_mask = in_m[:, None] & (slots[None, :] < K)
    tl.store(out_v_ptr + offs, best_v, mask=out_mask)
    tl.store(out_i_ptr + offs, best_i.to(tl.int64), mask=out_mask)
    if SELF:
        tl.store(row_max_ptr + rows, top, mask=in_m)


def _list_rows(kp: int, dtype: torch.dtype, most: int) -> int:
    """The most rows a program whose (rows, kp) lists fit 8 warps' registers without spilling in the
    inner loops: `most` (the kernel's own, the static check's finding) up to kp 64, half beyond,
    half again for fp64 lists, at least 16."""
    return max(16, most // (1 if kp <= 64 else 2) // (2 if dtype == torch.float64 else 1))


def _prepared(v: torch.Tensor, metric: str):
    """Rows as the kernel reads them (unit rows for cosine, contiguous) and their squared norms."""
    if metric == "cosine":
        v = F.normalize(v, dim=1, eps=COSINE_EPS)
    v = v.contiguous()
    return v, (v * v).sum(1)


def _scan(x: torch.Tensor, y: torch.Tensor, k: int, metric: str, self_pairs: bool, cross_rows: int):
    """The k nearest rows of y for every row of x (values, indices), and with `self_pairs` (y is x) the
    row maxima and the block d[:cross_rows, cross_rows:]."""
    M, D = x.shape
    values = x.new_empty((M, k))
    indices = x.new_empty((M, k), dtype=torch.long)
    row_max = x.new_empty((M if self_pairs else 0,))
    cross = x.new_empty((cross_rows, M - cross_rows) if self_pairs else (0, 0))
    if M == 0:
        return values, indices, row_max, cross
    x, x_norms = _prepared(x, metric)
    y, y_norms = (x, x_norms) if self_pairs else _prepared(y, metric)  # self: prepared once
    kp = triton.next_power_of_2(k)
    rows = rows_per_program(M, _list_rows(kp, x.dtype, 32), x.device)  # 64: spills in the fp32 SIMT loop
    _knn_kernel[(triton.cdiv(M, rows),)](
        x,
        y,
        x_norms,
        y_norms,
        values,
        indices,
        row_max,
        cross,
        M,
        y.shape[0],
        D,
        k,
        cross_rows,
        METRIC=_METRIC_IDS[metric],
        SELF=self_pairs,
        KP=kp,
        NO_INDEX=_NO_INDEX,
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=rows,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        # larger (rows, kp) lists, and self_knn's (its row maxima and block stores) from kp 128: more threads
        num_warps=8 if rows > 16 or kp >= (128 if self_pairs else 256) else 4,
        **COMPILE_OPTIONS,
    )
    return values, indices, row_max, cross


@on_input_device
def knn_forward(x: torch.Tensor, y: torch.Tensor, k: int, metric: str):
    """x (M, D), y (N, D), 1 <= k <= min(N, 256); computed in their compute dtype, as the C++ op (a direct call
    with float16 and float64 rows ran in float16)."""
    check_knn_gpu_k(k, "Triton")
    dtype = compute_dtype(x, y)
    return _scan(x.to(dtype), y.to(dtype), k, metric, False, 0)[:2]


@on_input_device
def self_lists(x: torch.Tensor, m: int, metric: str, cross_rows: int):
    """self_knn's kernel: the m nearest rows of x (N, D) for each of its rows in (distance, index) order,
    d(i, i) = 0, the row maxima and the block d[:cross_rows, cross_rows:], all from one pass."""
    return _scan(x, x, m, metric, True, cross_rows)


def _full_rows(x: torch.Tensor, metric: str, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the distance matrix (the kernel's formula and GEMM precision rule), d(i, i) = 0."""
    d = pairwise_distance_reference(x[rows], x, metric)
    d[torch.arange(len(rows), device=d.device), rows] = 0
    return d


@on_input_device
def self_knn_forward(x: torch.Tensor, k: int, metric: str, normalize: bool, cross_rows: int):
    """dpm_ops::self_knn's Triton twin: one scan of the full distance matrix's
    rows (no GEMM tile is shared between programs' lists, as on CUDA); with `normalize` it keeps k + 4
    raw neighbours and orders them as the other backends (ops/knn_certified.normalized_order)."""
    x = x.to(compute_dtype(x))  # as the C++ op: half rows in float32
    n = x.shape[0]
    m = raw_neighbours(n, k, normalize)
    if m > KNN_GPU_MAX_K:  # the message of csrc/knn/knn_cuda.cpp
        margin = f" with normalize (it keeps k + {TIE_MARGIN} neighbours)" if normalize else ""
        raise ValueError(
            f"self_knn: the Triton kernel takes k <= {KNN_GPU_MAX_K - (TIE_MARGIN if normalize else 0)}{margin}, got {k}"
        )
    values, indices, row_max, cross = self_lists(x, m, metric, cross_rows)
    if normalize:
        full_rows = functools.partial(_full_rows, x, metric)
        values, indices = normalized_order(values, indices, row_max, k, full_rows)
    return values, indices, row_max, cross
