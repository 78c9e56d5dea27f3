"""Checks of the models' constructor options, one helper per kind of option: each raises a ValueError
that names the model, the option and the range it must lie in, so a bad option is refused before a
model allocates anything (the engine reports it as one line naming model.options) rather than
crashing later in a forward pass or training silently on nonsense. The forward passes check their
inputs here too (check_images, check_camera_ids)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# check_flag, check_int, check_int_list, check_known_options and check_real serve the models' options too
from dpm_ops.ops._checks import (  # noqa: F401
    MAX_COEFFICIENT,
    check_flag,
    check_int,
    check_int_list,
    check_known_options,
    check_real,
    quote,
    values_hidden,
)
from dpm_ops.ops._checks import MAX_IMAGE_SIDE  # noqa: F401  (the config's bound too)

# The most weights a model may have, estimated from its options before it allocates any: ViT-G/14 has 1.8 B,
# 8 GB in float32 (training holds as much again for the gradients and for SGD's momentum). Far past it a model
# does not fit, and its many tensors, each allocated alone, meet the OOM killer rather than an allocator error.
MAX_WEIGHTS = 2 * 10**9
# The largest |pixel| the models take: normalised pixels lie within +-3, raw 0-255 ones within 255; from ~1e18 the
# squares in a float32 LayerNorm / BatchNorm overflow.
MAX_PIXEL = 1e6


def check_choice(model: str, name: str, value, choices: Sequence, why: str = "") -> None:
    if isinstance(value, bool) or value not in choices:  # True == 1: a flag is no stride
        wanted = repr(choices[0]) if len(choices) == 1 else f"one of {', '.join(map(repr, choices))}"
        raise ValueError(f"{model}: {name} must be {wanted}{why}, got {quote(value)}")


def check_classifier(model: str, num_classes: int, width: int) -> float:
    """check_weights of a (num_classes, width) classifier: 10^8 classes allocated (and zeroed) 12.8 GB before
    anything said no."""
    return check_weights(model, num_classes * width, f"a classifier of num_classes = {num_classes} at width {width}")


def check_weights(model: str, weights: float, source: str) -> float:
    """``weights``, a model's weight count estimated from its options (``source`` names them), or a ValueError
    when it is over MAX_WEIGHTS."""
    if weights > MAX_WEIGHTS:
        raise ValueError(
            f"{model}: {source}: about {weights:.3g} weights, more than the {MAX_WEIGHTS:.0e} a model may have"
        )
    return weights


def check_total_weights(model: str, **parts: float) -> None:
    """check_weights of a model's parts together (each was checked alone: three parts just under the bound
    would have allocated three times it)."""
    names = [name.replace("_", " ") for name in parts]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    check_weights(model, sum(parts.values()), f"its {listed} together")


def check_images(
    name: str,
    images,
    size: Optional[tuple[int, int]] = None,
    dtype: Optional[torch.dtype] = None,
) -> None:
    """A (B, 3, H, W) floating-point tensor (normalised RGB pixels) of finite values, H x W = `size` when given:
    torch's own errors for a missing batch axis or uint8 pixels name neither the argument nor what was
    expected. Checked before any layer runs: a train-mode forward that failed later had already written its
    batch into the BatchNorm statistics (NaN ones broke every later call), which also takes every value to be
    at most MAX_PIXEL in magnitude (ones of 1e20 overflowed the LayerNorm / BatchNorm statistics into NaN). The
    value check is one device sync, skipped while compiling or exporting."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W) (a batch of RGB images), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(
            f"{name} must be floating-point (normalised pixels, as the eval transform gives), got {images.dtype}"
        )
    if size is not None and tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(f"{name}: expected images of size {tuple(size)}, got {tuple(images.shape[-2:])}")
    # the first convolution's weights' dtype: torch's own error names neither; autocast casts them itself, all
    # but float64 ones
    if dtype is not None and images.dtype != dtype:
        if not torch.is_autocast_enabled(images.device.type):
            raise ValueError(f"{name} must be {dtype} (the model's dtype) outside autocast, got {images.dtype}")
        if images.dtype == torch.float64:
            raise ValueError(f"{name} must be {dtype} (the model's dtype) or float32: autocast leaves float64 as is")
    if images.numel() and images.device.type != "meta" and not values_hidden():
        low, high = torch.stack(torch.aminmax(images.detach())).tolist()  # NaN when any is
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        if max(-low, high) > MAX_PIXEL:
            raise ValueError(
                f"{name} holds values up to {max(-low, high):.3g}: expected normalised pixels, |value| <= "
                f"{MAX_PIXEL:g} (the eval transform's are below 3); far larger ones overflow the activations' float32 "
                "statistics"
            )


def check_train_batch(name: str, images, training: bool) -> None:
    """A train-mode forward of a model with BatchNorm layers needs 2 images or more: torch's error came from
    the first BatchNorm that saw the lone image, after the ones before it had taken it into their statistics."""
    if training and isinstance(images, torch.Tensor) and images.dim() > 0 and images.shape[0] < 2:
        raise ValueError(
            f"{name}: a train-mode forward needs at least 2 images (BatchNorm's batch statistics), got "
            f"{images.shape[0]}; model.eval() runs any batch"
        )


def check_image_pair(
    raw, masked, dtype: Optional[torch.dtype] = None, min_side: int = 1, training: bool = False
) -> None:
    """MaskReID's two streams: the raw images and their foreground-masked copies, of one shape, each side at
    least `min_side` pixels (what the trunk's pooling takes: below it torch's error names no argument)."""
    check_images("raw", raw, dtype=dtype)
    check_images("masked", masked, dtype=dtype)
    check_train_batch("raw", raw, training)  # masked has raw's shape, checked below
    if raw.shape != masked.shape:
        raise ValueError(f"raw {tuple(raw.shape)} and masked {tuple(masked.shape)} images differ in shape")
    if min(raw.shape[-2:]) < min_side:
        raise ValueError(
            f"raw and masked images must be at least {min_side} x {min_side} pixels, got {tuple(raw.shape[-2:])}"
        )


def check_camera_ids(cam_label, batch: int, num_cameras: int, device: torch.device) -> None:
    """One 0-based camera id per image, on the images' `device`, each below `num_cameras`: a batch of one id
    was broadcast to every image, and an id out of range an IndexError (on CUDA a device-side assert that
    ends the process).
    The range check is one device sync, skipped while compiling or exporting (a data-dependent branch)."""
    if cam_label is None:
        raise ValueError("this model has a camera embedding: pass cam_label (0-based camera ids)")
    if not isinstance(cam_label, torch.Tensor) or cam_label.dtype not in (torch.int64, torch.int32):
        kind = cam_label.dtype if isinstance(cam_label, torch.Tensor) else type(cam_label).__name__
        raise ValueError(f"cam_label must be an int64 (or int32) tensor of 0-based camera ids, got {kind}")
    if cam_label.dim() != 1 or cam_label.shape[0] != batch:
        raise ValueError(f"cam_label must have shape ({batch},), one camera id per image, got {tuple(cam_label.shape)}")
    if cam_label.device != device:
        raise ValueError(f"cam_label must be on the images' device {device}, got {cam_label.device}")
    if batch == 0 or values_hidden() or cam_label.is_meta:  # a meta tensor has no values
        return
    low, high = torch.stack(torch.aminmax(cam_label)).tolist()
    if low < 0 or high >= num_cameras:
        bad = low if low < 0 else high
        raise ValueError(f"cam_label must lie in [0, {num_cameras - 1}] (the model's {num_cameras} cameras), got {bad}")
