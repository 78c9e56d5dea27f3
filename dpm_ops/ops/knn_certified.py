"""The certified two-stage knn / self_knn on CUDA and Triton (docs/certified_knn.md, "GPU").

Stage 1 runs a bf16 tensor-core GEMM with fp32 accumulation and keeps, per row, every column whose
lower bound is <= the k-th smallest upper bound (triton/knn_certified.py for backend "triton"; for
backend "cuda" dpm_ops::knn_certified_candidates: cuBLAS GEMMs of row blocks, each turned into the
candidate buffers by one fused kernel, csrc/knn/knn_certified_kernels.cu). Stage 2 recomputes those candidates'
distances with the direct path's formula in the compute dtype (fp32 IEEE products, never TF32;
fp64 for fp64 input; one fused gather-and-sum kernel on either backend) and takes the first
k in (distance, index) order. Rows whose candidates overflow `cap` get the exact full-row
computation (an IEEE GEMM of those rows only).

The CUDA backend is registered here, in Python, as the CUDA kernel of the existing schemas
dpm_ops::knn_certified / self_knn_certified / knn_certified_bounds: the pipeline is torch ops around
the two stages' kernels, and the one copy of it serves both GPU backends (a C++ copy would duplicate
every step).
"""

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._precision import ieee_fp32_matmuls, process_setting, without_autocast
from ._checks import KNN_GPU_MAX_K, check_knn_gpu_k
from ._declare import lazy
from .knn import check_knn_args, check_self_knn_args
from .knn_reference import COSINE_EPS, compute_dtype, pairwise_distance_reference
from .kreciprocal_reference import row_chunks

U32 = 2.0**-24
# Rounding x (fp32, or fp64 -> fp32 -> bf16: the double rounding's 2^-23) to bf16, nearest even.
BF16_OPERAND_UNIT = 2.0**-8 + 2.0**-23
# Tensor-core fp32 accumulation: each block of b products is added to the accumulator after
# alignment to the largest exponent with truncation (no rounding to nearest), losing < 2^-23 of the
# largest term per term and < 2^-23 of the result: <= (b + 2) 2^-23 per block, at most 3 D 2^-23 of
# sum |x^ y^| over the dot product whatever the block size; 2^-21 per product covers it with margin.
TENSOR_CORE_ACCUMULATION_UNIT = 2.0**-21
MAX_NORM = 2.0**60  # bf16 products and fp32 sums of rows up to this norm stay finite
MAX_DIM = 1 << 20
MIN_CAP, CAP_PER_K = 256, 8  # the CPU kernel's per-row candidate cap (csrc/knn/knn_certified_cpu.cpp)
TIE_MARGIN = 4  # self_knn with normalize keeps k + 4 raw neighbours, as the direct paths (knn_operands.h)


def raw_neighbours(n: int, k: int, normalize: bool) -> int:
    """How many raw neighbours self_knn keeps per row of n: k, or with normalize k + TIE_MARGIN (at
    most n), among which the order by d / row max is decided. The GPU kernels' lists hold KNN_GPU_MAX_K."""
    return min(n, k + TIE_MARGIN) if normalize else k


_CHUNK_ELEMENTS = 1 << 25  # elements held at a time by stage 2 and by the exact rows


def gamma(dim: int, unit: float) -> float:
    """Higham's gamma_D: the error factor of any summation of D terms with per-add rounding `unit`."""
    return dim * unit / (1 - dim * unit)


def stage1_constant(dim: int, accumulation_unit: float = TENSOR_CORE_ACCUMULATION_UNIT):
    """c_D of docs/certified_knn.md: |s - p| <= c_D |x| |y| for the stage-1 dot product s (bf16 operands,
    products exact in fp32, summed in fp32 with `accumulation_unit`, fp32 output) and any fp32 dot
    product p."""
    v, g_acc, g = BF16_OPERAND_UNIT, gamma(dim, accumulation_unit), gamma(dim, U32)
    o = (1 + v) ** 2
    return g_acc * o + 2 * v + v * v + g


@dataclass
class Operand:
    """Rows in the compute dtype (unit rows for cosine, as the direct path), their squared norms, the rows
    in bf16, and the bound's per-row scale a (E = a_i a_j)."""

    rows: torch.Tensor
    norms: torch.Tensor
    bf16: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def of(v: torch.Tensor, metric: str, dtype: torch.dtype) -> "Operand":
        rows = v.detach().to(dtype)
        if metric == "cosine":
            rows = F.normalize(rows, dim=1, eps=COSINE_EPS)
        rows = rows.contiguous()
        norms = (rows * rows).sum(1)
        dim = rows.shape[1]
        # |x| from the computed squared norm (relative error < gamma_D); the 2^-10 and 2^-50 terms
        # cover the fp32 rounding of a, of a_i a_j and of s +- E, and underflow (the CPU bound's).
        factor = (1 + gamma(dim, U32)) * (1 + 2.0**-10)
        scales = (norms.double().sqrt() * factor + 2.0**-50) * math.sqrt(stage1_constant(dim))
        return Operand(rows, norms, rows.float().to(torch.bfloat16).contiguous(), scales.float())


def bound_applies(*operands: Operand) -> bool:
    """Whether the stage-1 bound holds for these rows (D < 2^20, norms <= 2^60); reads one value."""
    if operands[0].rows.shape[1] >= MAX_DIM:
        return False
    norms = torch.cat([o.norms for o in operands])
    return norms.numel() == 0 or bool(norms.max() <= MAX_NORM * MAX_NORM)


def square_root(raw):
    """The correctly rounded square root, as the C++, CUDA and Triton kernels take it. torch's CPU sqrt is
    not (torch 2.13: about a fifth of fp32 and 1% of fp64 values come out an ulp away), so CPU tensors go
    through numpy's (the hardware instruction)."""
    if raw.device.type != "cpu" or raw.requires_grad:
        return raw.sqrt()
    return torch.from_numpy(np.sqrt(raw.contiguous().numpy()))


def distance(dots, x_norms, y_norms, metric: str):
    """The direct path's distance from dot products and squared norms (broadcast): monotone
    non-increasing in the dot product, also after rounding."""
    if metric == "cosine":
        return 1 - dots
    raw = (x_norms + y_norms - 2 * dots).clamp_min(0)
    return square_root(raw) if metric == "euclidean" else raw


def candidate_cap(k: int, n: int) -> int:
    return min(n, max(MIN_CAP, CAP_PER_K * k))


def candidate_distances(x, y, x_norms, y_norms, rows, candidates, counts, metric: str, self_pairs: bool):
    """dpm_ops::knn_certified_candidate_distances in torch ops (its CPU kernel, the model of the CUDA and
    Triton kernels): distances (R, C) of rows `rows` of x to their first `counts` candidate columns of y
    (+inf past them), as the direct path computes them: the dot product in the compute dtype from IEEE
    products (no TF32). The rows go in order of their counts, in chunks that gather only as many
    candidates as the chunk's first (largest) count: about the candidates' own rows, not R x C of them."""
    out = torch.full(candidates.shape, math.inf, dtype=x.dtype, device=x.device)
    order = counts.argsort(descending=True)
    widths = counts[order].tolist()
    start = 0
    while start < len(order):
        width = max(1, widths[start])
        stop = min(len(order), start + max(1, _CHUNK_ELEMENTS // (width * y.shape[1])))
        chunk = order[start:stop]
        cols, row = candidates[chunk, :width].clamp_max(y.shape[0] - 1), rows[chunk]  # padding: N
        dots = (x[row, None, :] * y[cols]).sum(-1)
        d = distance(dots, x_norms[row, None], y_norms[cols], metric)
        if self_pairs:
            d = torch.where(cols == row[:, None], 0, d)
        past = torch.arange(width, device=d.device) >= counts[chunk, None]
        out[chunk, :width] = d.masked_fill(past, math.inf)
        start = stop
    return out


def exact_rows(xo: Operand, yo: Operand, rows, metric: str, self_pairs: bool):
    """Full distance rows (R, N) of rows `rows` of x: the fallback, by an IEEE GEMM in the compute dtype."""
    n = yo.rows.shape[0]
    out = torch.empty((len(rows), n), dtype=xo.rows.dtype, device=xo.rows.device)
    with ieee_fp32_matmuls():
        for r0, r1 in row_chunks(len(rows), n, _CHUNK_ELEMENTS):
            row = rows[r0:r1]
            d = distance(xo.rows[row] @ yo.rows.T, xo.norms[row, None], yo.norms[None, :], metric)
            if self_pairs:
                d[torch.arange(r1 - r0, device=d.device), row] = 0
            out[r0:r1] = d
    return out


def select(d, candidates, k: int):
    """The first k of each row in (distance, index) order; `candidates` ascending in every row."""
    values, order = torch.sort(d, dim=1, stable=True)
    return values[:, :k], candidates.gather(1, order[:, :k])


def _fp32_reductions():
    """cuBLAS's bf16 GEMMs keep their split-K reductions in fp32 inside the block (the bound's accumulation
    model). allow_bf16_reduced_precision_reduction is process-wide, switched off for the block (as
    ieee_fp32_matmuls)."""
    return process_setting(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)


def _bf16_gemm(a, b):
    """a @ b.T of bf16 rows, fp32 output and fp32 accumulation: cuBLAS; on CPU (tests) an IEEE fp32 GEMM of
    the bf16 values (exact products, fp32 sums: the same model)."""
    if a.is_cuda:
        with _fp32_reductions():
            return torch.mm(a, b.T, out_dtype=torch.float32)
    with ieee_fp32_matmuls():
        return a.float() @ b.float().T


def stage1_args(xo: Operand, yo: Operand):
    """What stage 1 reads of x and y, in the order of its kernels (dpm_ops::knn_certified_candidates, the
    Triton stage1): the bf16 rows, the squared norms and the bound's scales."""
    return xo.bf16, yo.bf16, xo.norms, yo.norms, xo.scales, yo.scales


def stage1_bounds(x, y, x_norms, y_norms, x_scales, y_scales, metric: str, diagonal=None):
    """Stage 1's (L, U) of the bf16 rows x against the bf16 rows y (stage1_args), in the norms' dtype; with
    `diagonal`, x's first row is row `diagonal` of y and the pairs of a row with itself get 0. The fused
    kernels (knn_certified_kernels.cu, Triton's _tile_bounds) compute the same in the same operations."""
    dots = _bf16_gemm(x, y).to(x_norms.dtype)
    err = (x_scales[:, None] * y_scales[None, :]).to(dots.dtype)
    lower = distance(dots + err, x_norms[:, None], y_norms[None, :], metric)
    upper = distance(dots - err, x_norms[:, None], y_norms[None, :], metric)
    if diagonal is not None:
        at = torch.arange(lower.shape[0], device=lower.device)
        lower[at, at + diagonal], upper[at, at + diagonal] = 0, 0
    return lower, upper


def _first_columns(mask, cap: int):
    """Per row the first `cap` columns where mask holds (int32, padded with N) and how many hold. The
    held entries in row-major order (nonzero: one pass over the mask, one sync) are each row's columns
    ascending, and an entry's slot is its position after its row's first entry. (A top-k of the
    column numbers instead read each block in several radix passes over int64 keys.)"""
    n = mask.shape[1]
    counts = mask.sum(1, dtype=torch.int32)
    columns = torch.full((mask.shape[0], cap), n, dtype=torch.int32, device=mask.device)
    row, column = mask.nonzero(as_tuple=True)
    slot = torch.arange(len(row), device=mask.device) - (counts.cumsum(0) - counts)[row]
    kept = slot < cap
    columns[row[kept], slot[kept]] = column[kept].int()
    return columns, counts


def candidates_torch(x, y, x_norms, y_norms, x_scales, y_scales, k: int, cap: int, metric: str, self_pairs: bool):
    """dpm_ops::knn_certified_candidates in torch ops, in row blocks of at most _CHUNK_ELEMENTS bounds: the
    op's CPU kernel (the tests' model of the CUDA one) and its stand-in for k > KNN_GPU_MAX_K on CUDA.
    It writes every bound and makes some 16 temporaries of their size (docs/certified_knn.md): the CUDA
    kernel reads the dot products twice instead."""
    parts = []
    for r0, r1 in row_chunks(x.shape[0], y.shape[0], _CHUNK_ELEMENTS):
        rows = slice(r0, r1)
        lower, upper = stage1_bounds(
            x[rows], y, x_norms[rows], y_norms, x_scales[rows], y_scales, metric, r0 if self_pairs else None
        )
        limits = upper.topk(k, dim=1, largest=False).values[:, -1:]
        part = _first_columns(lower <= limits, cap)
        if self_pairs:
            part += _first_columns(upper >= lower.amax(1, keepdim=True), cap)
        parts.append(part)
    if not parts:
        parts = [(*_no_rows(x, cap), *_no_rows(x, cap))]
    near, near_count, *far = (torch.cat(column) for column in zip(*parts))
    return (near, near_count, *far) if self_pairs else (near, near_count, *_no_rows(x, cap))


def _no_rows(like, cap: int):
    """Empty candidate buffers and counts (fresh tensors: an op's outputs never alias each other)."""
    return like.new_empty((0, cap), dtype=torch.int32), like.new_empty((0,), dtype=torch.int32)


def _triton_stage1(xo: Operand, yo: Operand, k: int, cap: int, metric: str, self_pairs: bool):
    from ..triton import knn_certified as kernels

    return kernels.stage1(*stage1_args(xo, yo), k, cap, metric, self_pairs)


@dataclass(frozen=True)
class Backend:
    """A GPU backend's two steps: stage 1 (the candidates; called on the two Operands) and stage 2's candidate
    distances (called as candidate_distances)."""

    stage1: Callable
    distances: Callable


def cublas(namespace: str = "dpm_ops") -> Backend:
    """Backend "cuda" on the stage ops of `namespace`: stage 1 <namespace>::knn_certified_candidates (on
    CUDA cuBLAS and one fused kernel), stage 2 <namespace>::knn_certified_candidate_distances. (The tests'
    CUDA emulator runs the same pipeline on its own build of the two ops: tests/cuda_emulation.)"""

    def stage1(xo: Operand, yo: Operand, k: int, cap: int, metric: str, self_pairs: bool):
        """Returns what triton/knn_certified.stage1 returns."""
        find = getattr(torch.ops, namespace).knn_certified_candidates if k <= KNN_GPU_MAX_K else candidates_torch
        with _fp32_reductions():
            near, near_count, far, far_count = find(*stage1_args(xo, yo), k, cap, metric, self_pairs)
        return (near, near_count, far, far_count) if self_pairs else (near, near_count, None, None)

    def distances(*args):
        return getattr(torch.ops, namespace).knn_certified_candidate_distances(*args)

    return Backend(stage1, distances)


TRITON = Backend(_triton_stage1, lazy("triton.knn_certified:candidate_distances"))
CUBLAS = cublas()  # backend "cuda": cuBLAS and CUDA kernels


# ---- the pipeline -------------------------------------------------------------------------------


def _candidates(buffer, buffer_count, rows):
    """The rows' candidate columns (R, their largest count; padded with N) and counts."""
    count = buffer_count[rows]
    return buffer[rows, : int(count.max())].long(), count


def _stage2(backend, xo, yo, near, near_count, k, cap, metric, self_pairs, values, indices, counts):
    """Stage 2 of the rows whose candidates fit `cap`, into values / indices / counts; returns the others."""
    fits = near_count <= cap
    rows = fits.nonzero().squeeze(1)
    if len(rows):
        candidates, count = _candidates(near, near_count, rows)
        d = backend.distances(xo.rows, yo.rows, xo.norms, yo.norms, rows, candidates, count, metric, self_pairs)
        values[rows], indices[rows] = select(d, candidates, k)
        counts[rows] = count.long()
    return (~fits).nonzero().squeeze(1)


def _exact(xo, yo, rows, k, metric, self_pairs, values, indices, row_max=None):
    """The fallback rows' first k (and row maxima) from their full distance rows."""
    n = yo.rows.shape[0]
    for r0, r1 in row_chunks(len(rows), n, _CHUNK_ELEMENTS):
        row = rows[r0:r1]
        d = exact_rows(xo, yo, row, metric, self_pairs)
        values[row], indices[row] = select(d, torch.arange(n, device=d.device).expand_as(d), k)
        if row_max is not None:
            row_max[row] = d.amax(1)


def knn_certified_rows(x, y, k: int, metric: str, backend: Backend):
    """knn by the certified search on `backend` (TRITON or CUBLAS): (values, indices, candidate counts,
    -1 for rows computed exactly)."""
    dtype = compute_dtype(x, y)
    m, n = x.shape[0], y.shape[0]
    values = x.new_empty((m, k), dtype=dtype)
    indices = x.new_empty((m, k), dtype=torch.long)
    counts = x.new_full((m,), -1, dtype=torch.long)
    if m == 0:
        return values, indices, counts
    xo, yo = Operand.of(x, metric, dtype), Operand.of(y, metric, dtype)
    fallback = torch.arange(m, device=x.device)
    if bound_applies(xo, yo):
        cap = candidate_cap(k, n)
        near, near_count = backend.stage1(xo, yo, k, cap, metric, False)[:2]
        fallback = _stage2(backend, xo, yo, near, near_count, k, cap, metric, False, values, indices, counts)
    _exact(xo, yo, fallback, k, metric, False, values, indices)
    return values, indices, counts


def _row_maxima(backend, xo, far, far_count, rows, metric, row_max):
    """Row maxima of the certified rows from their far candidates (U >= the row's largest L)."""
    if len(rows):
        candidates, count = _candidates(far, far_count, rows)
        d = backend.distances(xo.rows, xo.rows, xo.norms, xo.norms, rows, candidates, count, metric, True)
        row_max[rows] = d.masked_fill(candidates >= xo.rows.shape[0], -math.inf).amax(1)


def normalized_order(raw_values, raw_indices, row_max, k, full_rows: Callable):
    """The first k of each row by (distance / row max, index) from its m > k smallest raw distances; rows
    where that does not decide them are taken from their full rows, `full_rows(rows)` (R, N) with
    d(i, i) = 0 (the direct paths' rule, csrc/knn/knn_cuda.cpp). Also the Triton self_knn's."""
    n, m = row_max.shape[0], raw_values.shape[1]
    scale = torch.where(row_max > 0, row_max, 1)
    by_index, perm = raw_indices.sort(dim=1)
    raw_by_index = raw_values.gather(1, perm)
    keys, order = torch.sort(raw_by_index / scale[:, None], dim=1, stable=True)
    values, indices = raw_by_index.gather(1, order[:, :k]), by_index.gather(1, order[:, :k])
    if m < n:
        undecided = (keys[:, k - 1] >= raw_values[:, m - 1] / scale).nonzero().squeeze(1)
        for r0, r1 in row_chunks(len(undecided), n, _CHUNK_ELEMENTS):
            row = undecided[r0:r1]
            d = full_rows(row)
            order = torch.sort(d / scale[row, None], dim=1, stable=True).indices[:, :k]
            values[row], indices[row] = d.gather(1, order), order
    return values, indices


def self_knn_certified_rows(x, k: int, metric: str, normalize: bool, cross_rows: int, backend: Backend, max_k: int):
    """self_knn by the certified search (m = k, or k + 4 raw neighbours with normalize, as the direct
    path); also every row's candidate count (-1: computed exactly). `max_k`: stage 1's limit on m."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    n = x.shape[0]
    m = raw_neighbours(n, k, normalize)
    raw_values = x.new_empty((n, m))
    raw_indices = x.new_empty((n, m), dtype=torch.long)
    row_max = x.new_empty((n,))
    counts = x.new_full((n,), -1, dtype=torch.long)
    # The query x gallery block is returned in full: the direct path's GEMM.
    cross = pairwise_distance_reference(x[:cross_rows], x[cross_rows:], metric)
    if n == 0:
        return raw_values[:, :k], raw_indices[:, :k], row_max, cross, counts
    xo = Operand.of(x, metric, dtype)
    fallback = torch.arange(n, device=x.device)
    if m <= max_k and bound_applies(xo):
        cap = candidate_cap(m, n)
        near, near_count, far, far_count = backend.stage1(xo, xo, m, cap, metric, True)
        near_count = torch.where(far_count > cap, cap + 1, near_count)  # the row maximum overflowed
        fallback = _stage2(backend, xo, xo, near, near_count, m, cap, metric, True, raw_values, raw_indices, counts)
        _row_maxima(backend, xo, far, far_count, (counts >= 0).nonzero().squeeze(1), metric, row_max)
    _exact(xo, xo, fallback, m, metric, True, raw_values, raw_indices, row_max)
    if normalize:
        full_rows = functools.partial(exact_rows, xo, xo, metric=metric, self_pairs=True)
        values, indices = normalized_order(raw_values, raw_indices, row_max, k, full_rows)
    else:
        values, indices = raw_values, raw_indices
    return values, indices, row_max, cross, counts


# ---- implementations: the Triton twins (declared in ops/knn.py) and the CUDA kernels ------------


def knn_certified_triton(x, y, k, metric):
    check_knn_gpu_k(k, "Triton")
    return knn_certified_rows(x, y, k, metric, TRITON)


def self_knn_certified_triton(x, k, metric, normalize, cross_rows):
    return self_knn_certified_rows(x, k, metric, normalize, cross_rows, TRITON, KNN_GPU_MAX_K)


def _knn_certified_bounds_cuda(x, y, metric="euclidean"):
    dtype = compute_dtype(x, y)
    xo, yo = Operand.of(x, metric, dtype), Operand.of(y, metric, dtype)
    if not bound_applies(xo, yo):
        raise ValueError("knn_certified_bounds: rows too large (norm > 2^60) or too long (D >= 2^20) for the bound")
    return stage1_bounds(*stage1_args(xo, yo), metric)


def cuda_kernels(backend: Backend) -> dict:
    """{op name: kernel}: the CUDA kernels of the ops declared in ops/knn.py whose pipeline is Python, on
    `backend` (CUBLAS; the tests' emulator passes its own cublas()), each run without autocast."""

    def knn_certified(x, y, k, metric="euclidean"):
        check_knn_args(x, y, k, metric)  # what the C++ CPU kernel checks
        return knn_certified_rows(x, y, k, metric, backend)

    def self_knn_certified(x, k, metric="sqeuclidean", normalize=False, cross_rows=0):
        check_self_knn_args(x, k, metric, normalize, cross_rows)
        return self_knn_certified_rows(x, k, metric, normalize, cross_rows, backend, x.shape[0])

    kernels = {
        "knn_certified": knn_certified,
        "self_knn_certified": self_knn_certified,
        "knn_certified_bounds": _knn_certified_bounds_cuda,
    }
    return {name: without_autocast(kernel) for name, kernel in kernels.items()}


# CUDA kernels of the ops declared in ops/knn.py (their CPU kernels: csrc/knn/knn_certified_cpu.cpp).
for _name, _kernel in cuda_kernels(CUBLAS).items():
    torch.library.register_kernel(f"dpm_ops::{_name}", "cuda", _kernel)
# ... and the CPU kernels of the stages' ops, whose CUDA kernels are C++ (knn_certified_cuda.cpp).
torch.library.register_kernel("dpm_ops::knn_certified_candidates", "cpu", without_autocast(candidates_torch))
torch.library.register_kernel(
    "dpm_ops::knn_certified_candidate_distances", "cpu", without_autocast(candidate_distances)
)
