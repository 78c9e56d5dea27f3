"""Triton kernel of the fused distance + top-k (maths and tie rule: dpm_ops/ops/knn_reference.py).

One program per BLOCK_M rows of x streams y in BLOCK_N-column tiles: a distance tile from tl.dot
(fp32 IEEE or TF32 by torch's matmul precision, fp64: triton/_precision.py), then a merge of the
tile into the rows' running top-K held in registers (merge_tile, also used by knn_certified.py). The
(M, N) matrix is never written; the output is written once. The register lists cap k at 256, as the CUDA kernel's shared memory.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..ops._checks import check_knn_gpu_k
from ..ops.knn_reference import COSINE_EPS
from ._device import on_input_device
from ._precision import dot, dot_precision

# Tiles chosen with the static check (scripts/static_check): the merge loop's few live registers
# spilled under other shapes with Triton 3.6's or 3.9's ptxas; this one is spill-free with both.
BLOCK_M = 8
BLOCK_N = 64
BLOCK_D = 16
_NO_INDEX = 2**31 - 1  # larger than any column: placeholders lose every index tie (int32 lists: half the registers)
_METRIC_IDS = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2}


@triton.jit
def _lexicographic_min(values, indices, NO_INDEX: tl.constexpr):
    """Per row: the smallest value and, among equal ones, the smallest index."""
    v = tl.min(values, axis=1)
    i = tl.min(tl.where(values == v[:, None], indices, NO_INDEX), axis=1)
    return v, i


@triton.jit
def merge_tile(dist, tile_i, best_v, best_i, K, KP: tl.constexpr, NO_INDEX: tl.constexpr):
    """The rows' K smallest (value, index) pairs of a tile and their sorted lists, as new sorted lists:
    K rounds, each taking the smaller (value, index) of the tile's and the list's current minimum."""
    slots = tl.arange(0, KP)
    new_v = tl.full(best_v.shape, float("inf"), best_v.dtype)
    new_i = tl.full(best_i.shape, NO_INDEX, tl.int32)
    for t in range(0, K):
        tv, ti = _lexicographic_min(dist, tile_i, NO_INDEX)
        bv, bi = _lexicographic_min(best_v, best_i, NO_INDEX)
        from_tile = (tv < bv) | ((tv == bv) & (ti < bi))
        v = tl.where(from_tile, tv, bv)
        i = tl.where(from_tile, ti, bi)
        here = slots[None, :] == t
        new_v = tl.where(here, v[:, None], new_v)
        new_i = tl.where(here, i[:, None], new_i)
        # Take the chosen entry out of its source (its index stays: a taken tile entry can only
        # come back as an inf placeholder, which finite values displace).
        dist = tl.where(from_tile[:, None] & (tile_i == ti[:, None]), float("inf"), dist)
        best_v = tl.where((~from_tile)[:, None] & (best_i == bi[:, None]), float("inf"), best_v)
        best_i = tl.where((~from_tile)[:, None] & (best_i == bi[:, None]), NO_INDEX, best_i)
    return new_v, new_i


@triton.jit
def _knn_kernel(
    x_ptr,
    y_ptr,
    xn_ptr,
    yn_ptr,
    out_v_ptr,
    out_i_ptr,
    M,
    N,
    D,
    K,
    METRIC: tl.constexpr,
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
    slots = tl.arange(0, KP)
    best_v = tl.full((BLOCK_M, KP), float("inf"), acc_t)
    best_i = tl.full((BLOCK_M, KP), NO_INDEX, tl.int32)
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
                dist = tl.sqrt(dist)
        dist = tl.where(in_n[None, :], dist, float("inf"))
        tile_i = tl.where(in_n[None, :], cols[None, :], NO_INDEX) + tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
        best_v, best_i = merge_tile(dist, tile_i, best_v, best_i, K, KP, NO_INDEX)
    offs = rows[:, None].to(tl.int64) * K + slots[None, :]
    out_mask = in_m[:, None] & (slots[None, :] < K)
    tl.store(out_v_ptr + offs, best_v, mask=out_mask)
    tl.store(out_i_ptr + offs, best_i.to(tl.int64), mask=out_mask)


@on_input_device
def knn_forward(x: torch.Tensor, y: torch.Tensor, k: int, metric: str):
    """x (M, D), y (N, D) of one float dtype (float32 or float64), 1 <= k <= min(N, 256)."""
    check_knn_gpu_k(k, "Triton")
    M, D = x.shape
    values = torch.empty((M, k), dtype=x.dtype, device=x.device)
    indices = torch.empty((M, k), dtype=torch.long, device=x.device)
    if M == 0:
        return values, indices
    if metric == "cosine":
        x, y = F.normalize(x, dim=1, eps=COSINE_EPS), F.normalize(y, dim=1, eps=COSINE_EPS)
    x, y = x.contiguous(), y.contiguous()
    x_norms, y_norms = (x * x).sum(1), (y * y).sum(1)
    kp = triton.next_power_of_2(k)
    _knn_kernel[(triton.cdiv(M, BLOCK_M),)](
        x,
        y,
        x_norms,
        y_norms,
        values,
        indices,
        M,
        y.shape[0],
        D,
        k,
        METRIC=_METRIC_IDS[metric],
        KP=kp,
        NO_INDEX=_NO_INDEX,
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
        num_warps=8 if kp >= 256 else 4,
    )  # the (BLOCK_M, kp) lists: spread over more threads
    return values, indices
