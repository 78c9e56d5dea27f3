"""The batch-hard soft-margin triplet loss (TransReID's, DPM's metric loss) fused: distances,
mining, softplus, mean.

    d = sqrt(max(‖x_i‖² + ‖x_j‖² − 2 x_i·x_j, 1e-12)),  loss = mean_i softplus(max_pos d − min_neg d)

value and gradient equal to the reference (batch_hard_triplet_reference.py; the maths in
csrc/batch_hard_triplet/batch_hard_triplet_math.h transcribe it, tie-breaking included). One Gram GEMM and one mining pass; only the (B, B) Gram is materialised (no distance,
mask or filled copies). The gradient (closed form over each anchor's two mined pairs) is computed in the
same call when autograd needs it; the backward only rescales it.

Declared op ``batch_hard_triplet``, with C++ kernels for CPU and CUDA and a Triton twin (mining in Triton).
"""

from typing import Optional

import torch

from .. import _backend
from ._checks import check_batch, check_finite_rows, check_labels
from ._declare import declare, gradient_wanted
from .batch_hard_triplet_reference import batch_hard_triplet_reference


def check_batch_hard_triplet_args(features, labels) -> None:
    """ValueError naming the argument: shapes, dtypes, devices (_check_op_args) and the features' values."""
    _check_op_args(features, labels)
    check_finite_rows("batch_hard_triplet", features=features)


def _check_op_args(features, labels, with_grad=False) -> None:
    """What the kernels take (the Triton twin's check; the C++ ops make the same ones)."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"batch_hard_triplet: features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"batch_hard_triplet: features must be 2-D (B, C), got shape {tuple(features.shape)}")
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"batch_hard_triplet: features must be float32 or float64, got {features.dtype}")
    check_labels("batch_hard_triplet", labels, features)
    check_batch("batch_hard_triplet", "features", features)


def _fake(features, labels, with_grad):
    grad = torch.empty_like(features, memory_format=torch.contiguous_format) if with_grad else features.new_empty((0,))
    return features.new_empty(()), grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _autograd(_no_backward_op, ctx, grad, _unused):
    (grad_features,) = ctx.saved_tensors
    if grad_features.dim() != 2:
        raise RuntimeError("batch_hard_triplet: called with with_grad=False, so it cannot be differentiated")
    return grad * grad_features, None, None


# Returns (loss, grad): with with_grad, the loss's gradient w.r.t. the features for a unit upstream
# gradient (the backward only rescales it); else an empty tensor.
BATCH_HARD_TRIPLET = declare(
    "batch_hard_triplet",
    "(Tensor features, Tensor labels, bool with_grad) -> (Tensor, Tensor)",
    _fake,
    triton="triton.batch_hard_triplet:loss_and_grad",
    check=_check_op_args,
    reference=batch_hard_triplet_reference,
    setup_context=_setup_context,
    autograd=_autograd,
)


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """The fused loss (0-dim) of float32 / float64 features (B, C) and int64 labels (B,);
    differentiable in the features. ``backend``: "reference" | "cpp" | "cuda" | "triton" (None: by
    device). The loss module ``dpm_ops.losses.batch_hard_soft_margin_triplet`` also promotes fp16 / bf16."""
    check_batch_hard_triplet_args(features, labels)
    name = _backend.resolve(backend, features.device)
    if name == "reference":
        return BATCH_HARD_TRIPLET.run(name, features, labels)
    with_grad = gradient_wanted(features)
    return BATCH_HARD_TRIPLET.run(name, features, labels, with_grad)[0]
