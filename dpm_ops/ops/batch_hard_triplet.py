"""The batch-hard soft-margin triplet loss (dpm.md §6) fused: distances, mining, softplus, mean.

    d = sqrt(max(‖x_i‖² + ‖x_j‖² − 2 x_i·x_j, 1e-12)),  loss = mean_i softplus(max_pos d − min_neg d)

value and gradient equal to ``dpm_ops.losses.batch_hard_soft_margin_triplet(..., fused=False)`` (the
reference; the maths in csrc/batch_hard_triplet/batch_hard_triplet_math.h transcribe it, tie-breaking
included). One Gram GEMM and one mining pass; only the (B, B) Gram is materialised (no distance,
mask or filled copies). The gradient (closed form over each anchor's two mined pairs) is computed in the
same call when autograd needs it; the backward only rescales it.

Schemas: ``dpm_ops::batch_hard_triplet`` (python_bindings/batch_hard_triplet.cpp; C++ kernels for CPU
and CUDA) and ``dpm_ops::batch_hard_triplet_triton`` (mining in Triton).
"""

from typing import Optional

import torch

from .. import _backend
from ._checks import check_batch, check_finite_rows


def check_batch_hard_triplet_args(features, labels) -> None:
    """ValueError naming the argument."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"batch_hard_triplet: features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"batch_hard_triplet: features must be 2-D (B, C), got shape {tuple(features.shape)}")
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"batch_hard_triplet: features must be float32 or float64, got {features.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"batch_hard_triplet: labels must be 1-D of length B = {features.shape[0]}, got {shape}")
    if labels.dtype != torch.int64:
        raise ValueError(f"batch_hard_triplet: labels must be int64, got {labels.dtype}")
    if labels.device != features.device:
        raise ValueError(
            f"batch_hard_triplet: labels must be on the features' device {features.device}, got {labels.device}"
        )
    check_batch("batch_hard_triplet", "features", features)
    check_finite_rows("batch_hard_triplet", features=features)


def _fake(features, labels, with_grad):
    grad = torch.empty_like(features) if with_grad else features.new_empty((0,))
    return features.new_empty(()), grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _unused):
    (grad_features,) = ctx.saved_tensors
    if grad_features.dim() != 2:
        raise RuntimeError("batch_hard_triplet: called with with_grad=False, so it cannot be differentiated")
    return grad * grad_features, None, None


def _register(op) -> None:
    torch.library.register_fake(op)(_fake)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


if _backend.extension()[0] is not None:
    _register(torch.ops.dpm_ops.batch_hard_triplet.default)


@torch.library.custom_op("dpm_ops::batch_hard_triplet_triton", mutates_args=())
def batch_hard_triplet_triton(
    features: torch.Tensor, labels: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..triton import batch_hard_triplet as kernels

    return kernels.loss_and_grad(features, labels, with_grad)


_register(batch_hard_triplet_triton)


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """The fused loss (0-dim) of float32 / float64 features (B, C) and int64 labels (B,);
    differentiable in the features. ``backend``: "cpp" | "cuda" | "triton" (None: by device). The
    reference (and promotion from fp16 / bf16) is ``dpm_ops.losses.batch_hard_soft_margin_triplet``."""
    check_batch_hard_triplet_args(features, labels)
    name = _backend.resolve(backend, features.device)
    if name == "reference":
        raise ValueError(
            "batch_hard_triplet is the fused kernel; its reference is "
            "dpm_ops.losses.batch_hard_soft_margin_triplet(..., fused=False)"
        )
    with_grad = torch.is_grad_enabled() and features.requires_grad
    if name == "triton":
        return torch.ops.dpm_ops.batch_hard_triplet_triton(features, labels, with_grad)[0]
    return torch.ops.dpm_ops.batch_hard_triplet(features, labels, with_grad)[0]
