"""Triton kernels of the hierarchical masked pooling (maths: ops/hierarchical_mask_pool_reference.py).

One launch covers every level: a descriptor table (int64, one row per level: data address, grad
address, C, H*W, first tile, output column offset, weight column offset) tells each program which
level its tile of BLOCK_R rows (b, c) belongs to; rows stream their H*W cells in BLOCK_HW chunks.
The mask is resized to each level (area average) in torch first: (B, 1, H, W) is tiny.
"""

import torch
import triton
import triton.language as tl

from ..ops.hierarchical_mask_pool_reference import resize_mask
from .._precision import compute_dtype
from ._device import on_input_device
from ._precision import COMPILE_OPTIONS, div_rn

BLOCK_R = 16
BLOCK_HW = 64
_DESC = 7  # columns of the descriptor table
_DATA, _GRAD, _CHANNELS, _HW, _TILE, _OUT, _WEIGHT = range(_DESC)


@triton.jit
def _level_of_program(desc_ptr, num_levels, pid):
    level = pid * 0
    for candidate in range(1, num_levels):
        first_tile = tl.load(desc_ptr + candidate * 7 + 4)
        level = tl.where(pid >= first_tile, candidate, level)
    return level


@triton.jit
def _cell_weights(w_ptr, b, total_hw, weight_offset, c, m2, HAS_MASK: tl.constexpr):
    """Weights of cells c of the rows' samples b: the resized mask, or 1 on every valid cell."""
    if HAS_MASK:
        w = tl.load(w_ptr + b[:, None] * total_hw + weight_offset + c[None, :], mask=m2, other=0.0)
    else:
        w = tl.where(m2, 1.0, 0.0).to(w_ptr.dtype.element_ty)
    return w


@triton.jit
def _pool_kernel(
    desc_ptr,
    w_ptr,
    wsum_ptr,
    out_ptr,
    grad_ptr,
    B,
    num_levels,
    total_channels,
    total_hw,
    MAX_MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    level = _level_of_program(desc_ptr, num_levels, pid)
    d = desc_ptr + level * 7
    elem_t = out_ptr.dtype.element_ty
    x_ptr = tl.load(d + 0).to(tl.pointer_type(elem_t), bitcast=True)
    channels = tl.load(d + 2)
    hw = tl.load(d + 3)
    rows = (pid - tl.load(d + 4)) * BLOCK_R + tl.arange(0, BLOCK_R)
    out_offset = tl.load(d + 5)
    weight_offset = tl.load(d + 6)
    in_rows = rows < B * channels
    b = rows // channels
    out_idx = b * total_channels + out_offset + rows % channels
    acc_t = wsum_ptr.dtype.element_ty
    if HAS_MASK:
        total = tl.load(wsum_ptr + b * num_levels + level, mask=in_rows, other=0.0)
    else:
        total = tl.zeros((BLOCK_R,), dtype=acc_t) + hw.to(acc_t)
    cells = tl.arange(0, BLOCK_HW)
    if not BACKWARD:
        best = tl.full((BLOCK_R,), float("-inf"), acc_t)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float64)  # in fp64, as the C++ and CUDA kernels' rows
        for c0 in range(0, hw, BLOCK_HW):
            c = c0 + cells
            m2 = in_rows[:, None] & (c < hw)[None, :]
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * hw + c[None, :], mask=m2, other=0.0).to(acc_t)
            w = _cell_weights(w_ptr, b, total_hw, weight_offset, c, m2, HAS_MASK)
            if MAX_MODE:
                cand = tl.where(w > 0, x, float("-inf"))
                best = tl.maximum(best, tl.max(cand, axis=1), propagate_nan=tl.PropagateNan.ALL)
            else:
                acc += tl.sum(w.to(tl.float64) * x.to(tl.float64), axis=1)
        if MAX_MODE:
            v = tl.where(total > 0, best, 0.0)
        else:
            # rounded to the compute dtype first, as the C++ and CUDA kernels round (and the interpreter's bf16 store
            # of an fp64 value gave 0 or inf)
            v = tl.where(total > 0, div_rn(acc, tl.where(total > 0, total, 1.0).to(tl.float64)), 0.0).to(acc_t)
        tl.store(out_ptr + out_idx, v.to(elem_t), mask=in_rows)
    else:
        gx_ptr = tl.load(d + 1).to(tl.pointer_type(elem_t), bitcast=True)
        g = tl.load(grad_ptr + out_idx, mask=in_rows, other=0.0).to(acc_t)
        o = tl.load(out_ptr + out_idx, mask=in_rows, other=0.0).to(acc_t)
        ties = tl.zeros((BLOCK_R,), dtype=acc_t)
        if MAX_MODE:
            for c0 in range(0, hw, BLOCK_HW):
                c = c0 + cells
                m2 = in_rows[:, None] & (c < hw)[None, :]
                x = tl.load(x_ptr + rows[:, None].to(tl.int64) * hw + c[None, :], mask=m2, other=0.0).to(acc_t)
                w = _cell_weights(w_ptr, b, total_hw, weight_offset, c, m2, HAS_MASK)
                ties += tl.sum(tl.where((w > 0) & (x == o[:, None]), 1.0, 0.0).to(acc_t), axis=1)
        for c0 in range(0, hw, BLOCK_HW):
            c = c0 + cells
            m2 = in_rows[:, None] & (c < hw)[None, :]
            offs = rows[:, None].to(tl.int64) * hw + c[None, :]
            w = _cell_weights(w_ptr, b, total_hw, weight_offset, c, m2, HAS_MASK)
            if MAX_MODE:
                x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(acc_t)
                hit = (w > 0) & (x == o[:, None]) & (ties[:, None] > 0)
                gx = tl.where(hit, div_rn(g[:, None], tl.where(ties > 0, ties, 1.0)[:, None]), 0.0)
            else:
                gx = tl.where(total[:, None] > 0, div_rn(g[:, None] * w, tl.where(total > 0, total, 1.0)[:, None]), 0.0)
            tl.store(gx_ptr + offs, gx.to(elem_t), mask=m2)


def _weights(features, mask, acc):
    """Packed resized mask (B, Σ H_l W_l) and its per-(b, level) sums (B, L), in `acc` (summed in fp64, as the
    C++ and CUDA kernels sum them)."""
    resized = [resize_mask(mask.to(acc), f.shape[-2:]).flatten(1) for f in features]
    sums = torch.stack([r.sum(1, dtype=torch.float64) for r in resized], 1).to(acc)
    return torch.cat(resized, 1).contiguous(), sums.contiguous()


def _launch(features, grads, mask, mode, out, grad):
    B = features[0].shape[0]
    acc = compute_dtype(features[0].dtype)
    device = features[0].device
    tiles, table = 0, []
    out_offset = weight_offset = 0
    for f, gf in zip(features, grads):
        C, hw = f.shape[1], f.shape[2] * f.shape[3]
        table.append([f.data_ptr(), gf.data_ptr() if gf is not None else 0, C, hw, tiles, out_offset, weight_offset])
        tiles += triton.cdiv(B * C, BLOCK_R)
        out_offset += C
        weight_offset += hw
    if tiles == 0:
        return
    desc = torch.tensor(table, dtype=torch.int64).to(device)
    if mask is not None:
        w, wsum = _weights(features, mask, acc)
    else:
        w = wsum = torch.empty(0, dtype=acc, device=device)
    _pool_kernel[(tiles,)](
        desc,
        w,
        wsum,
        out,
        grad if grad is not None else out,
        B,
        len(features),
        out_offset,
        weight_offset,
        MAX_MODE=mode == "max",
        HAS_MASK=mask is not None,
        BACKWARD=grad is not None,
        BLOCK_R=BLOCK_R,
        BLOCK_HW=BLOCK_HW,
        **COMPILE_OPTIONS,
    )


@on_input_device
def hierarchical_mask_pool_forward(features, mask, mode):
    features = [f.contiguous() for f in features]
    out = torch.empty(
        (features[0].shape[0], sum(f.shape[1] for f in features)), dtype=features[0].dtype, device=features[0].device
    )
    _launch(features, [None] * len(features), mask, mode, out, None)
    return out


@on_input_device
def hierarchical_mask_pool_backward(grad, features, mask, out, mode):
    features = [f.contiguous() for f in features]
    grads = [torch.empty_like(f) for f in features]
    _launch(features, grads, mask, mode, out.contiguous(), grad.contiguous())
    return grads
