"""Loss and op maths run in at least fp32 (inputs may be bf16/fp16 under autocast); shared by
dpm_ops.losses and the references of dpm_ops.ops (which must not import dpm_ops.losses: cycle)."""

import functools

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 -> float32; float32 and float64 unchanged (float64 keeps reference tests exact)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def common_at_least_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """All tensors in one dtype: the widest of theirs and float32."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)
    return [t.to(dtype) for t in tensors]
