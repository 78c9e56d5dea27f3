"""Reading images and foreground masks with Pillow, with errors that name the file."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError, DatasetNotFoundError

# A mask pixel is foreground when its 8-bit value is at least this (1-bit PNGs read as 0/255).
MASK_THRESHOLD = 128

# Pascal VOC's label maps (what an FCN trained on it gives): the person is class 15.
VOC_PERSON = 15

# Greyscale modes holding 16-bit samples (PNG / TIFF); "I" is what 32-bit integer files open as.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(path: str, kind: str) -> Image.Image:
    try:
        image = Image.open(path)
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"{kind} not found: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"unreadable {kind}: {path} ({error})") from error
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        image.close()  # else the file stays open until garbage collection (a ResourceWarning)
        raise DatasetError(f"unreadable {kind}: {path} ({error})") from error
    return image


def _to_8bit(image: Image.Image, path: str, kind: str) -> Image.Image:
    """``image`` with 8-bit samples: Pillow's convert() clips 16-bit greyscale at 255 (near-white),
    so 0..65535 is scaled to 0..255 here; a file whose values all fit 0..255 (8-bit data, e.g. a 0/255
    mask, saved in a 16-bit container) keeps them. Other bit depths are refused rather than guessed."""
    if image.mode in SIXTEEN_BIT_MODES:
        samples = np.asarray(image)
        low, high = (int(samples.min()), int(samples.max())) if samples.size else (0, 0)
        if image.mode == "I" and (low < 0 or high > 0xFFFF):
            raise DatasetError(
                f"unsupported {kind}: {path} has 32-bit samples ({low}..{high}); convert it to 8 or 16 bits"
            )
        scaled = samples if high <= 0xFF else (samples.astype(np.uint32) + 128) // 257
        return Image.fromarray(scaled.astype(np.uint8), "L")
    if image.mode == "F":
        raise DatasetError(f"unsupported {kind}: {path} has floating-point samples; convert it to 8 or 16 bits")
    return image


@contextlib.contextmanager
def decoded(path: str, kind: str) -> Iterator[Image.Image]:
    """The whole file decoded, in 8 bits per sample (a mode convert() maps faithfully), turned upright by its
    EXIF orientation as image viewers show it (a phone's crop tagged "rotate 90" was read sideways; the
    published re-ID sets carry no such tag); the file is closed on exit."""
    with _open(path, kind) as image:
        ImageOps.exif_transpose(image, in_place=True)
        yield _to_8bit(image, path, kind)


def check_mask_size(path: str, mask_size: tuple[int, int], expected_size: tuple[int, int]) -> None:
    """A mask of another size than its image means the mask tree does not belong to these images."""
    if tuple(mask_size) != tuple(expected_size):
        raise DatasetError(
            f"mask {path} is {mask_size[0]}x{mask_size[1]} but its image is {expected_size[0]}x{expected_size[1]}"
        )


def read_image(path: str) -> Image.Image:
    """Decode an image file as RGB."""
    with decoded(path, "image") as image:
        return image.convert("RGB")


def _binary(mask: Image.Image, name: str, expected_size: tuple[int, int] | None) -> Image.Image:
    """An 'L' mask thresholded at MASK_THRESHOLD; one whose values all lie below it but not all 0 is refused (a
    0 / 1 label image came out all background, silently)."""
    highest = mask.getextrema()[1]
    if 0 < highest < MASK_THRESHOLD:
        raise DatasetError(
            f"mask {name} holds values 0..{highest}: a label image? A mask is 0 / 255 (or 1-bit, or bool), "
            f"foreground >= {MASK_THRESHOLD}"
        )
    if expected_size is not None:
        check_mask_size(name, mask.size, expected_size)
    return mask.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)


def read_mask(path: str, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode a foreground mask as a binary 'L' image (0 background, 255 foreground): its grey levels, or its
    alpha channel where it has transparency.

    expected_size is the (width, height) of the image it belongs to.
    """
    with decoded(path, "mask") as mask:
        mask = _mask_levels(mask)
    return _binary(mask, path, expected_size)


def _voc_colour(index: int) -> tuple[int, int, int]:
    """Pascal VOC's label colour of class ``index``: its bits spread over the channels' high bits."""
    rgb = [0, 0, 0]
    for shift in range(7, -1, -1):
        for channel in range(3):
            rgb[channel] |= ((index >> channel) & 1) << shift
        index >>= 3
    return rgb[0], rgb[1], rgb[2]


VOC_PALETTE = [value for index in range(256) for value in _voc_colour(index)]  # 255: VOC's "void" border


def _mask_levels(mask: Image.Image) -> Image.Image:
    """A mask's 'L' levels: its alpha channel where it has transparency (a cutout: RGB holds the person's pixels,
    whose grey levels were read as the mask; a palette image's transparency too), the person of a label map in
    VOC's palette (the segmentation network's argmax: car or train colours read as bright as a person's), else
    its grey levels."""
    if mask.mode in ("P", "PA"):
        if mask.mode == "PA" or "transparency" in mask.info:
            mask = mask.convert("RGBA")
        else:
            foreground = _voc_foreground(mask)
            if foreground is not None:
                return foreground
    if "A" in mask.getbands():
        alpha = mask.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return mask.convert("L")


def _voc_foreground(mask: Image.Image) -> Image.Image | None:
    """A label map's foreground where each class index it uses (0, background, and 255, VOC's "void" border,
    aside: a palette of the 21 classes has no 255th colour) has VOC's colour: its person pixels (class 15, the
    spec's argmax == person: none in a crop of other classes alone), or, holding class 1 alone, those (DAVIS-style
    object masks share the palette: index 1 is the object). None where it is no such map or holds no class (read
    by grey level, as a 0 / 255 mask)."""
    labels = np.asarray(mask)
    classes = set(np.unique(labels).tolist()) - {0, 255}
    palette = mask.getpalette() or []
    if not classes or any(palette[3 * c : 3 * c + 3] != VOC_PALETTE[3 * c : 3 * c + 3] for c in classes):
        return None
    foreground = labels == (1 if classes == {1} else VOC_PERSON)
    return Image.fromarray(foreground.astype(np.uint8) * 255, "L")


def _array(value: np.ndarray, name: str, kind: str, dtypes: tuple, channels: tuple) -> np.ndarray:
    """``value`` if it is an (H, W) or (H, W, C) array of one of ``dtypes`` (C in ``channels``)."""
    shape_ok = value.ndim == 2 or (value.ndim == 3 and value.shape[2] in channels)
    if value.dtype not in dtypes or not shape_ok or 0 in value.shape[:2]:
        shapes = "(H, W)" + "".join(f" or (H, W, {c})" for c in channels)
        raise ValueError(
            f"{name}: {kind} arrays must be {shapes} of {' or '.join(str(np.dtype(d)) for d in dtypes)}, "
            f"got {value.shape} {value.dtype}"
        )
    return np.ascontiguousarray(value)


def as_rgb(image, name: str) -> Image.Image:
    """An image given as a file path, a PIL image or an (H, W, 3) RGB / (H, W) grey uint8 array, as an
    RGB PIL image; errors name ``name`` (e.g. ``images[3]``) or the file."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array(image, name, "image", (np.uint8,), (3,))).convert("RGB")
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise ValueError(f"{name} is an empty image ({image.width} x {image.height} pixels)")
        return _to_8bit(image, name, "image").convert("RGB")
    raise ValueError(f"{name} must be an image path, a PIL image or a uint8 array, got {type(image).__name__}")


def as_mask(mask, name: str, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """A foreground mask given as a file path, a PIL image or an (H, W) bool / uint8 array, as
    :func:`read_mask` returns it (uint8: foreground from ``MASK_THRESHOLD``)."""
    if isinstance(mask, (str, os.PathLike)):
        return read_mask(os.fspath(mask), expected_size)
    if isinstance(mask, np.ndarray):
        values = _array(mask, name, "mask", (np.bool_, np.uint8), ())
        return _binary(
            Image.fromarray(values.astype(np.uint8) * 255 if values.dtype == np.bool_ else values), name, expected_size
        )
    if isinstance(mask, Image.Image):  # read as a file's pixels are (an RGBA cutout was read by its brightness)
        if 0 in mask.size:
            raise ValueError(f"{name} is an empty mask ({mask.width} x {mask.height} pixels)")
        return _binary(_mask_levels(_to_8bit(mask, name, "mask")), name, expected_size)
    raise ValueError(f"{name} must be a mask path, a PIL image or a bool / uint8 array, got {type(mask).__name__}")
