"""Reading images and foreground masks with Pillow, with errors that name the file."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from .errors import DatasetError, DatasetNotFoundError

# A mask pixel is foreground when its 8-bit value is at least this (1-bit PNGs read as 0/255).
MASK_THRESHOLD = 128


def _open(path: str, kind: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"{kind} not found: {path}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"unreadable {kind}: {path} ({error})") from error
    return image


def read_image(path: str) -> Image.Image:
    """Decode an image file as RGB."""
    return _open(path, "image").convert("RGB")


def read_mask(path: str, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode a foreground mask as a binary 'L' image (0 background, 255 foreground).

    expected_size is the (width, height) of the image it belongs to; a mask of another size
    means the mask tree does not belong to these images.
    """
    mask = _open(path, "mask").convert("L")
    if expected_size is not None and mask.size != tuple(expected_size):
        raise DatasetError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {expected_size[0]}x{expected_size[1]}"
        )
    return mask.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)
