"""Hierarchical masked pooling as a torch custom op: every level pooled in one launch.

    features: [x_l (B, C_l, H_l, W_l)],  mask: (B, 1, H, W) or None  ->  (B, Σ C_l)

per level the masked average (``mode="avg"``) or masked max (``"max"``) over H_l x W_l, the mask
resized to the level by area averaging; the exact rule (and the empty-mask case) is in
hierarchical_mask_pool_reference.py. Used by MaskReID's skipped fusing layer (masked average of
several backbone stages) and DPM's Hierarchical Mask Generator (global max-pool of the masked maps).

Declared ops ``hierarchical_mask_pool`` / ``..._backward``, with C++ kernels for CPU and CUDA and
Triton twins. Gradients flow to the features only: the mask is a constant weight.
"""

from typing import Optional, Sequence

import torch

from .. import _backend
from .._precision import compute_dtype
from ._checks import check_finite, check_from_forward, check_nonnegative, check_result_finite, values_hidden
from ._declare import declare
from .hierarchical_mask_pool_reference import hierarchical_mask_pool_reference

MODES = ("avg", "max")
MAX_LEVELS = 16  # the packed launch's descriptor table (csrc/hierarchical_mask_pool/*_math.h)


def check_hierarchical_mask_pool_args(features, mask, mode) -> None:
    """ValueError naming the argument for anything the kernels cannot take."""
    if mode not in MODES:
        raise ValueError(f"hierarchical_mask_pool: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        raise ValueError("hierarchical_mask_pool: features must be a non-empty list of (B, C, H, W) tensors")
    if len(features) > MAX_LEVELS:
        raise ValueError(f"hierarchical_mask_pool: features may hold at most {MAX_LEVELS} maps, got {len(features)}")
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            raise ValueError(f"hierarchical_mask_pool: features[{i}] must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 4:
            raise ValueError(
                f"hierarchical_mask_pool: features[{i}] must be 4-D (B, C, H, W), got shape {tuple(f.shape)}"
            )
        if not f.is_floating_point():
            raise ValueError(f"hierarchical_mask_pool: features[{i}] must be floating point, got {f.dtype}")
        if f.shape[2] == 0 or f.shape[3] == 0:
            raise ValueError(f"hierarchical_mask_pool: features[{i}] has an empty spatial size {tuple(f.shape)}")
        first = features[0]
        if f.shape[0] != first.shape[0]:
            raise ValueError(
                f"hierarchical_mask_pool: features[{i}] has batch {f.shape[0]}, features[0] has {first.shape[0]}"
            )
        if f.dtype != first.dtype or f.device != first.device:
            raise ValueError(
                f"hierarchical_mask_pool: features[{i}] must share dtype and device with features[0], "
                f"got {f.dtype} on {f.device} vs {first.dtype} on {first.device}"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"hierarchical_mask_pool: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        B = features[0].shape[0]
        if mask.dim() != 4 or mask.shape[0] != B or mask.shape[1] != 1 or mask.shape[2] == 0 or mask.shape[3] == 0:
            raise ValueError(f"hierarchical_mask_pool: mask must be (B, 1, H, W) with B = {B}, got {tuple(mask.shape)}")
        if mask.device != features[0].device:
            raise ValueError(
                f"hierarchical_mask_pool: mask must be on the features' device {features[0].device}, got {mask.device}"
            )
        if mask.is_complex():
            raise ValueError(f"hierarchical_mask_pool: mask must be real (bool, integer or float), got {mask.dtype}")


def _check_op_args(features, mask, mode) -> None:
    """The op's arguments: the function's, with the mask already in the features' dtype or their compute dtype
    (the function passes its normalised weights in the latter)."""
    check_hierarchical_mask_pool_args(features, mask, mode)
    dtype = features[0].dtype
    if mask is not None and mask.dtype not in (dtype, compute_dtype(dtype)):
        raise ValueError(
            "hierarchical_mask_pool: mask must share dtype and device with the features (the op takes the weights "
            f"in their {dtype} or {compute_dtype(dtype)}), got {mask.dtype}"
        )


def _check_backward_args(grad, features, mask, out, mode) -> None:
    """The forward's arguments, then grad and out (B, sum C_l) as the forward gives them."""
    _check_op_args(features, mask, mode)
    first = features[0]
    shape = (first.shape[0], sum(f.shape[1] for f in features))
    for name, t in (("grad", grad), ("out", out)):
        check_from_forward("hierarchical_mask_pool_backward", name, t, shape, first.dtype, first.device)


def _fake_forward(features, mask, mode):
    return features[0].new_empty((features[0].shape[0], sum(f.shape[1] for f in features)))


def _fake_backward(grad, features, mask, out, mode):
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in features]


def _setup_context(ctx, inputs, output):
    features, mask, mode = inputs
    ctx.save_for_backward(mask, output, *features)
    ctx.mode = mode


def _autograd(backward_op, ctx, grad):
    mask, out, *features = ctx.saved_tensors
    return list(backward_op(grad, features, mask, out, ctx.mode)), None, None


HIERARCHICAL_MASK_POOL_BACKWARD = declare(
    "hierarchical_mask_pool_backward",
    "(Tensor grad, Tensor[] features, Tensor? mask, Tensor out, str mode) -> Tensor[]",
    _fake_backward,
    triton="triton.hierarchical_mask_pool:hierarchical_mask_pool_backward",
    check=_check_backward_args,
)
HIERARCHICAL_MASK_POOL = declare(
    "hierarchical_mask_pool",
    "(Tensor[] features, Tensor? mask, str mode) -> Tensor",
    _fake_forward,
    triton="triton.hierarchical_mask_pool:hierarchical_mask_pool_forward",
    check=_check_op_args,
    reference=hierarchical_mask_pool_reference,
    backward=HIERARCHICAL_MASK_POOL_BACKWARD,
    setup_context=_setup_context,
    autograd=_autograd,
)


def hierarchical_mask_pool(
    features: Sequence[torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    mode: str = "avg",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-level masked average / max pooling of ``features`` [(B, C_l, H_l, W_l)], concatenated (B, Σ C_l).

    ``mask`` (B, 1, H, W), any real dtype (e.g. a bool foreground mask), is resized to each level by
    area averaging and used as constant weights (no gradient); levels whose resized mask is all zero
    for a sample pool to 0. ``mask=None`` is plain global average / max pooling. ``backend`` forces
    "reference" | "cpp" | "cuda" | "triton" (default: by device, see dpm_ops.backends()).
    """
    check_hierarchical_mask_pool_args(features, mask, mode)
    features = list(features)
    if mask is not None:
        mask = mask.detach().to(torch.float64)
        check_finite("hierarchical_mask_pool", mask=mask)
        check_nonnegative("hierarchical_mask_pool", mask=mask)
        mask = _weights_in(compute_dtype(features[0].dtype), _normalized_weights(mask))
    # The mask, small, is checked up front (also in magnitude: it weighs the sums). The maps: a max
    # can skip a NaN (the Triton kernel's does), so max mode checks them before; every average sums
    # all of its map's values (a NaN or inf times a zero weight is NaN), so avg mode finds NaN, inf
    # and overflow (the reference's fp32 sums; the kernels' are fp64) in its small (B, sum C_l) output
    # instead of a second pass over the maps; only a sample with an all-zero mask, pooled to 0 without
    # a sum, has its maps checked on their own.
    named = {f"features[{i}]": f for i, f in enumerate(features)}
    if mode == "max":
        check_finite("hierarchical_mask_pool", **named)
    name = _backend.resolve(backend, features[0].device)
    out = HIERARCHICAL_MASK_POOL.run(name, features, mask, mode)
    if mode == "avg":
        check_result_finite("hierarchical_mask_pool", out, **named)
        if mask is not None:
            _check_unweighted_samples(named, mask)
    return out


def _normalized_weights(mask: torch.Tensor) -> torch.Tensor:
    """The float64 mask with each sample's weights scaled by the power of two that brings the largest into
    [1, 2): the maps' dtype then holds them whatever the mask's magnitude (a mask of 1e-50 for float32 maps,
    of 1e5 for float16 ones), and the pooled values do not change (a weighted average and the cells of
    weight > 0 are the same under a per-sample scale, and a power of two scales without rounding; a binary
    mask keeps its weights)."""
    largest = mask.flatten(1).amax(1).view(-1, *(1,) * (mask.dim() - 1))
    lift = torch.where(largest < 2.0**-1000, 2.0**100, 1.0)  # a subnormal maximum: 2^-exponent would overflow
    mask, largest = mask * lift, largest * lift
    mantissa, _ = torch.frexp(largest)  # largest = mantissa * 2^exponent, mantissa in [0.5, 1)
    return mask * torch.where(largest > 0, 2 * mantissa / largest, 1.0)  # exactly 2^(1 - exponent)


def _weights_in(dtype: torch.dtype, weights: torch.Tensor) -> torch.Tensor:
    """The float64 weights in the kernels' compute dtype (float16 maps' weights in float16 dropped every weight
    below 6e-8 of the sample's largest: cells a max pools over, w > 0, were left out), a weight too small for
    it raised to its smallest normal: still > 0, and nothing an average would see."""
    cast = weights.to(dtype)
    return torch.where((cast == 0) & (weights > 0), torch.finfo(dtype).tiny, cast)


def _check_unweighted_samples(named: dict, mask: torch.Tensor) -> None:
    """A sample whose mask is all zero pools to 0 without summing its maps, so their NaN or inf would not
    reach the output: those samples' maps are checked here (one sync; usually there is none)."""
    if values_hidden():
        return
    empty = mask.flatten(1).amax(1) <= 0
    if bool(empty.any()):
        check_finite("hierarchical_mask_pool", **{name: f.detach()[empty] for name, f in named.items()})
