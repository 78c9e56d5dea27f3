"""Triton kernels of stage 1 of the certified k-NN (docs/certified_knn.md, "GPU"; pipeline: ops/knn_certified.py).

Both kernels recompute one bf16 tensor-core GEMM (tl.dot, fp32 accumulator) tile by tile, one program
per BLOCK_M rows streaming every column, and turn each dot product s into the interval
[L, U] = [distance(s + E), distance(s - E)], E = a_i a_j (the per-row scales carry the bound):

* _limits_kernel: per row the k-th smallest U (offer_tile of the direct kernel keeps the k smallest
  across tiles; a tile whose U all lie above every row's current k-th costs one comparison) and, for
  self_knn's row maximum, the largest L;
* _collect_kernel: per row the columns with L <= the k-th smallest U ("near") and, for the row
  maximum, those with U >= the largest L ("far"), in ascending column order into buffers of `cap`
  slots; the counts go on past `cap` (such a row falls back to the exact computation).

A program owns its rows across all tiles, so the buffers need no atomics and come out sorted.

Stage 2's distances come from _candidate_kernel: one program per row and block of its candidates
gathers their rows and sums exact elementwise products (never TF32), reading no memory past the
row's count (the torch version gathers a (rows, widest count, D) block and sums it).
"""

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from ._device import on_input_device, rows_per_program
from ._precision import COMPILE_OPTIONS, sqrt_rn
from .knn import _METRIC_IDS, _NO_INDEX, empty_lists, _list_rows, offer_tile

# Tiles. Up to 64 rows a program (knn._list_rows for the limits kernel's lists): the GEMM tile of a
# Hopper warpgroup instruction, and each column tile read from L2 serves 64 rows (8 rows made the
# limits kernel bound by L2 reads: 71 GB at Market scale).
BLOCK_N = 64
BLOCK_D = 32


@triton.jit
def _distance(dots, x_norm, y_norm, METRIC: tl.constexpr):
    """ops/knn_certified.py's distance() (the direct path's formula) in the norms' dtype; the
    square root correctly rounded, so the bounds stay monotone in the dot product."""
    if METRIC == 2:
        return 1.0 - dots
    raw = tl.maximum(x_norm[:, None] + y_norm[None, :] - 2.0 * dots, 0.0)
    if METRIC == 0:
        raw = sqrt_rn(raw)
    return raw


@triton.jit
def _tile_bounds(
    xb,
    yb,
    yn,
    ys,
    rows,
    cols,
    N,
    x_norm,
    x_scale,
    D,
    SELF: tl.constexpr,
    METRIC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATED: tl.constexpr,
):
    """(L, U) of a (rows, cols) tile; rows clamped into range, columns past N read column N - 1 (the
    callers mask both)."""
    cols = tl.minimum(cols, N - 1)
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d[None, :] < D
        xt = tl.load(xb + rows[:, None].to(tl.int64) * D + d[None, :], mask=in_d, other=0.0)
        yt = tl.load(yb + cols[:, None].to(tl.int64) * D + d[None, :], mask=in_d, other=0.0)
        if EMULATED:  # the interpreter multiplies bf16 bit patterns: exact fp32 products, the same sums
            acc = tl.dot(xt.to(tl.float32), tl.trans(yt).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(yt), acc, out_dtype=tl.float32)  # bf16 products, fp32 accumulation
    y_norm = tl.load(yn + cols)
    dots = acc.to(y_norm.dtype)
    err = (x_scale[:, None] * tl.load(ys + cols)[None, :]).to(y_norm.dtype)
    lower = _distance(dots + err, x_norm, y_norm, METRIC)
    upper = _distance(dots - err, x_norm, y_norm, METRIC)
    if SELF:  # self_knn's d(i, i) = 0 exactly
        diagonal = rows[:, None] == cols[None, :]
        lower = tl.where(diagonal, 0.0, lower)
        upper = tl.where(diagonal, 0.0, upper)
    return lower, upper


@triton.jit
def _row_block(xn, xs, M, BLOCK_M: tl.constexpr):
    """The program's rows (clamped into range), which of them are real, their squared norms and scales."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = rows < M
    rows = tl.minimum(rows, M - 1)
    return rows, in_m, tl.load(xn + rows), tl.load(xs + rows)


# Sizes and k are not specialised (only D is, for its loads): one compiled variant per metric and dtype.
@triton.jit(do_not_specialize=["M", "N", "K"])
def _limits_kernel(
    xb,
    yb,
    xn,
    yn,
    xs,
    ys,
    limit_ptr,
    top_ptr,
    M,
    N,
    D,
    K,
    SELF: tl.constexpr,
    TRACK_MAX: tl.constexpr,
    METRIC: tl.constexpr,
    KP: tl.constexpr,
    NO_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATED: tl.constexpr,
):
    rows, in_m, x_norm, x_scale = _row_block(xn, xs, M, BLOCK_M)
    best_v, best_i, kth, worst_i, live = empty_lists(BLOCK_M, K, KP, xn.dtype.element_ty, NO_INDEX)
    top = tl.full((BLOCK_M,), float("-inf"), xn.dtype.element_ty)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        in_n = cols[None, :] < N
        lower, upper = _tile_bounds(xb, yb, yn, ys, rows, cols, N, x_norm, x_scale, D, SELF, METRIC, BLOCK_D, EMULATED)
        if TRACK_MAX:
            top = tl.maximum(top, tl.max(tl.where(in_n, lower, float("-inf")), axis=1))
        upper = tl.where(in_n, upper, float("inf"))
        tile_i = tl.where(in_n, cols[None, :], NO_INDEX) + tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        best_v, best_i, kth, worst_i = offer_tile(upper, tile_i, best_v, best_i, kth, worst_i, live, K, NO_INDEX)
    tl.store(limit_ptr + rows, kth, mask=in_m)
    if TRACK_MAX:
        tl.store(top_ptr + rows, top, mask=in_m)


@triton.jit
def _append(out_ptr, rows, cols, take, count, CAP):
    """Appends the columns `take` picks to the rows' buffers of CAP slots (in column order); new counts."""
    picked = take.to(tl.int32)
    slot = count[:, None] + tl.cumsum(picked, axis=1) - 1
    tl.store(out_ptr + rows[:, None].to(tl.int64) * CAP + slot, cols[None, :] + 0 * slot, mask=take & (slot < CAP))
    return count + tl.sum(picked, axis=1)


@triton.jit(do_not_specialize=["M", "N", "CAP"])
def _collect_kernel(
    xb,
    yb,
    xn,
    yn,
    xs,
    ys,
    limit_ptr,
    top_ptr,
    near_ptr,
    near_count_ptr,
    far_ptr,
    far_count_ptr,
    M,
    N,
    D,
    CAP,
    SELF: tl.constexpr,
    TRACK_MAX: tl.constexpr,
    METRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EMULATED: tl.constexpr,
):
    rows, in_m, x_norm, x_scale = _row_block(xn, xs, M, BLOCK_M)
    limit = tl.load(limit_ptr + rows)
    near_count = tl.zeros((BLOCK_M,), tl.int32)
    far_count = tl.zeros((BLOCK_M,), tl.int32)
    if TRACK_MAX:
        top = tl.load(top_ptr + rows)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        valid = in_m[:, None] & (cols[None, :] < N)
        lower, upper = _tile_bounds(xb, yb, yn, ys, rows, cols, N, x_norm, x_scale, D, SELF, METRIC, BLOCK_D, EMULATED)
        near_count = _append(near_ptr, rows, cols, valid & (lower <= limit[:, None]), near_count, CAP)
        if TRACK_MAX:
            far_count = _append(far_ptr, rows, cols, valid & (upper >= top[:, None]), far_count, CAP)
    tl.store(near_count_ptr + rows, near_count, mask=in_m)
    if TRACK_MAX:
        tl.store(far_count_ptr + rows, far_count, mask=in_m)


@on_input_device
def stage1(x_bf16, y_bf16, x_norms, y_norms, x_scales, y_scales, k: int, cap: int, metric: str, self_pairs: bool):
    """Stage 1 on bf16 rows (M, D), (N, D), squared norms in the compute dtype and fp32 bound scales;
    k <= 256 (the register lists). With self_pairs (x is y: self_knn) the diagonal is 0 and the row
    maxima's candidates are collected too. Returns (near (M, cap) int32 padded with N, near counts,
    far, far counts) (far: None without self_pairs)."""
    M, D = x_bf16.shape
    N = y_bf16.shape[0]
    dtype, device = x_norms.dtype, x_norms.device
    limits = torch.empty(M, dtype=dtype, device=device)
    near = torch.full((M, cap), N, dtype=torch.int32, device=device)
    near_count = torch.empty(M, dtype=torch.int32, device=device)
    # Without self_pairs the row-maximum buffers are never touched: the near ones stand in for them.
    tops = torch.empty_like(limits) if self_pairs else limits
    far = torch.full_like(near, N) if self_pairs else near
    far_count = torch.empty_like(near_count) if self_pairs else near_count
    result = (near, near_count, far, far_count) if self_pairs else (near, near_count, None, None)
    if M == 0:
        return result
    operands = (x_bf16, y_bf16, x_norms, y_norms, x_scales, y_scales, limits, tops)
    kp = max(32, triton.next_power_of_2(k))  # one compiled variant for every k <= 32 (a few registers more)
    limits_rows = rows_per_program(M, _list_rows(kp, dtype, 64), device)
    _limits_kernel[(triton.cdiv(M, limits_rows),)](
        *operands,
        M,
        N,
        D,
        k,
        SELF=self_pairs,
        TRACK_MAX=self_pairs,
        METRIC=_METRIC_IDS[metric],
        KP=kp,
        NO_INDEX=_NO_INDEX,
        BLOCK_M=limits_rows,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        EMULATED=triton_interpreted(),
        num_warps=8,
        **COMPILE_OPTIONS,
    )
    collect_rows = rows_per_program(M, 64, device)
    _collect_kernel[(triton.cdiv(M, collect_rows),)](
        *operands,
        near,
        near_count,
        far,
        far_count,
        M,
        N,
        D,
        cap,
        SELF=self_pairs,
        TRACK_MAX=self_pairs,
        METRIC=_METRIC_IDS[metric],
        BLOCK_M=collect_rows,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        EMULATED=triton_interpreted(),
        num_warps=8,  # the (64, 64) tile's bounds, slots and masks: spill-free with two buffers
        **COMPILE_OPTIONS,
    )
    return result


CANDIDATE_BLOCK_C = 64
CANDIDATE_BLOCK_D = 64


@triton.jit(do_not_specialize=["C"])
def _candidate_kernel(
    x_ptr,
    y_ptr,
    xn_ptr,
    yn_ptr,
    rows_ptr,
    cand_ptr,
    count_ptr,
    out_ptr,
    C,
    D,
    SELF: tl.constexpr,
    METRIC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = tl.load(rows_ptr + r)
    count = tl.load(count_ptr + r)
    valid = slots < count
    cols = tl.load(cand_ptr + r * C + slots, mask=valid, other=0).to(tl.int64)
    x_norm = tl.load(xn_ptr + row + tl.arange(0, 1))
    dots = tl.zeros((BLOCK_C,), dtype=x_norm.dtype)
    if tl.program_id(1) * BLOCK_C < count:  # else every slot is past the count: +inf, nothing read
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            in_d = d < D
            xv = tl.load(x_ptr + row * D + d, mask=in_d, other=0.0)
            yv = tl.load(y_ptr + cols[:, None] * D + d[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
            dots += tl.sum(yv * xv[None, :], axis=1)
    y_norm = tl.load(yn_ptr + cols, mask=valid, other=0.0)
    dist = tl.reshape(_distance(dots[None, :], x_norm, y_norm, METRIC), (BLOCK_C,))
    if SELF:  # self_knn's d(i, i) = 0 exactly
        dist = tl.where(cols == row, 0.0, dist)
    tl.store(out_ptr + r * C + slots, tl.where(valid, dist, float("inf")), mask=slots < C)


@on_input_device
def candidate_distances(x_rows, y_rows, x_norms, y_norms, rows, candidates, counts, metric: str, self_pairs: bool):
    """Distances (R, C) of rows `rows` of x to their first `counts` candidate columns (R, C) (+inf past
    them): the direct path's formula on dot products of exact elementwise products in the rows'
    dtype (fp32 / fp64), the rows (unit rows for cosine) and squared norms of ops/knn_certified.Operand."""
    R, C = candidates.shape
    out = torch.empty((R, C), dtype=x_rows.dtype, device=x_rows.device)
    if R == 0 or C == 0:
        return out
    _candidate_kernel[(R, triton.cdiv(C, CANDIDATE_BLOCK_C))](
        x_rows,
        y_rows,
        x_norms,
        y_norms,
        rows.contiguous(),
        candidates.contiguous(),
        counts.to(torch.int32).contiguous(),
        out,
        C,
        x_rows.shape[1],
        SELF=self_pairs,
        METRIC=_METRIC_IDS[metric],
        BLOCK_C=CANDIDATE_BLOCK_C,
        BLOCK_D=CANDIDATE_BLOCK_D,
        **COMPILE_OPTIONS,
    )
    return out
