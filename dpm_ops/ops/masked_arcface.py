"""DPM's ID loss fused: masked cosine + ArcFace margin + scale + cross-entropy (+ the plain branch).

    loss = plain_w · CE(f Wᵀ, y) + masked_w · CE(s · ArcFace_m(masked_cosine(f, m, W)), y)

value and gradients equal to the reference (masked_arcface_reference.py, which the maths in
csrc/masked_arcface/masked_arcface_math.h transcribes, quirks included).
The kernels never hold more than one (B, K) matrix: logits are produced row-chunk by row-chunk and
consumed at once. Since the loss is a scalar, the gradients (for a unit upstream gradient) are computed
in the same pass when autograd needs them (``with_grad``), as a fused linear cross-entropy does; the
backward only rescales them. That takes 9 GEMMs where eager autograd takes 10, and no recomputation.

Declared op ``masked_arcface_ce``, with C++ kernels for CPU and CUDA and a Triton twin.
"""

from typing import Optional

import torch

from .. import _backend
from ._checks import (
    MAX_COEFFICIENT,
    check_batch,
    check_finite_rows,
    check_label_range,
    check_labels,
    check_real,
)
from ._declare import declare, gradient_wanted
from .masked_arcface_reference import check_arcface_options, masked_arcface_reference
from .masked_cosine import check_masked_cosine_args


def check_masked_arcface_args(
    features, mask, weight, labels, scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight
) -> None:
    """ValueError naming the argument (shapes, dtypes, devices, numbers; the label range is checked by the
    kernels: the C++ CPU kernel for free, the CUDA kernel and the Triton twin with one sync)."""
    check_masked_cosine_args(
        features, mask, weight, 1e-12, "masked_arcface_cross_entropy", ("features", "mask", "weight")
    )
    check_labels("masked_arcface_cross_entropy", labels, features)
    check_batch("masked_arcface_cross_entropy", "features", features)
    if weight.shape[0] == 0:
        raise ValueError("masked_arcface_cross_entropy: weight must have at least one class (K >= 1)")
    check_masked_arcface_options(scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight)


def check_masked_arcface_options(scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight) -> None:
    """The loss's numbers and flag (MaskedArcFaceLoss checks them when it is built)."""
    check_arcface_options("masked_arcface_cross_entropy", scale, margin, easy_margin, clamp_eps)
    for name, value in (("plain_weight", plain_weight), ("masked_weight", masked_weight)):  # < 0 rewards the loss
        check_real("masked_arcface_cross_entropy", name, value, 0, MAX_COEFFICIENT)


def _check_kernel_args(features, mask, weight, labels, *options) -> None:
    """What the fused kernels take: the loss's arguments in float32 or float64."""
    check_masked_arcface_args(features, mask, weight, labels, *options)
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"masked_arcface_cross_entropy: features must be float32 or float64, got {features.dtype}")


def _check_twin_args(features, mask, weight, labels, *options_and_with_grad) -> None:
    """The Triton twin's check: also the labels' range, as the C++ CPU kernel (past it its rows were NaN)."""
    _check_kernel_args(features, mask, weight, labels, *options_and_with_grad[:-1])
    check_label_range("masked_arcface_cross_entropy", labels, weight.shape[0])


def _fake_forward(
    features, mask, weight, labels, scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight, with_grad
):
    if not with_grad:
        return (features.new_empty(()), features.new_empty((0,)), features.new_empty((0,)), features.new_empty((0,)))
    return (
        features.new_empty(()),
        torch.empty_like(features, memory_format=torch.contiguous_format),
        torch.empty_like(mask, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    _, grad_features, grad_mask, grad_weight = output
    ctx.save_for_backward(grad_features, grad_mask, grad_weight)
    ctx.mark_non_differentiable(grad_features, grad_mask, grad_weight)


def _autograd(_no_backward_op, ctx, grad, *_unused):
    # The loss is a scalar: its gradients were computed with the forward, for a unit upstream gradient.
    grad_features, grad_mask, grad_weight = ctx.saved_tensors
    if grad_weight.dim() != 2:
        raise RuntimeError("masked_arcface_ce: called with with_grad=False, so it cannot be differentiated")
    return (grad * grad_features, grad * grad_mask, grad * grad_weight) + (None,) * 8


# Returns (loss, grad_features, grad_mask, grad_weight): with with_grad, the loss's gradients for a
# unit upstream gradient, computed in the same pass; without, three empty tensors.
MASKED_ARCFACE_CE = declare(
    "masked_arcface_ce",
    "(Tensor features, Tensor mask, Tensor weight, Tensor labels, float scale, float margin, bool easy_margin,"
    " float clamp_eps, float plain_weight, float masked_weight, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    _fake_forward,
    triton="triton.masked_arcface:loss_and_grads",
    check=_check_twin_args,
    reference=masked_arcface_reference,
    setup_context=_setup_context,
    autograd=_autograd,
)


def masked_arcface_ce(
    features: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 30.0,
    margin: float = 0.5,
    easy_margin: bool = False,
    clamp_eps: float = 1e-7,
    plain_weight: float = 0.5,
    masked_weight: float = 0.5,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The fused loss (0-dim) on float32 / float64 inputs of one dtype; differentiable in features,
    mask and weight. ``backend``: "reference" | "cpp" | "cuda" | "triton" (None: by device). The loss
    module ``dpm_ops.losses.masked_arcface_cross_entropy`` also handles promotion from fp16 / bf16
    and autocast."""
    _check_kernel_args(
        features, mask, weight, labels, scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight
    )
    name = _backend.resolve(backend, features.device)
    check_finite_rows("masked_arcface_cross_entropy", features=features, mask=mask, weight=weight)
    # as Python numbers on every backend (a fractions.Fraction, a numbers.Real, was a TypeError in the reference)
    options = (float(scale), float(margin), bool(easy_margin), float(clamp_eps), float(plain_weight))
    args = (features, mask, weight, labels, *options, float(masked_weight))
    if name == "reference":  # the kernels check the labels' range themselves (the C++ CPU kernel in its own pass)
        check_label_range("masked_arcface_cross_entropy", labels, weight.shape[0])
        return MASKED_ARCFACE_CE.run(name, *args)
    # Gradients are computed in the forward pass, so only when autograd will ask for them.
    with_grad = gradient_wanted(features, mask, weight)
    return MASKED_ARCFACE_CE.run(name, *args, with_grad)[0]
