"""Foreground-mask trees for MaskReID.

Layout (MGCAM's convention, whose precomputed masks drop in): every image folder of a
dataset has a mirror folder named ``<folder>_seg`` holding one PNG per image, with the same
relative path and the image's suffix replaced by ``.png``::

    Market-1501-v15.09.15/bounding_box_train/0002_c1s1_000451_03.jpg
    Market-1501-v15.09.15/bounding_box_train_seg/0002_c1s1_000451_03.png
    Occluded_REID/occluded_body_images/001/001_01.tif
    Occluded_REID/occluded_body_images_seg/001/001_01.png

The ``_seg`` folders sit in the dataset folder by default, or under another ``mask_root`` given to
the loader (same folder names inside it). A mask is 1-bit or 8-bit, values >= 128 foreground, or an image with
transparency (a cutout), its alpha channel the mask.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .errors import DatasetError, DatasetNotFoundError

MASK_FOLDER_SUFFIX = "_seg"
MASK_SUFFIX = ".png"


def mask_path_for(image_path: str, dataset_dir: str, mask_root: str | None = None) -> str:
    """Path of the mask of ``image_path``, an image somewhere under ``dataset_dir``."""
    relative = Path(os.path.relpath(image_path, dataset_dir))
    top, *rest = relative.parts
    mirrored = Path(mask_root or dataset_dir, top + MASK_FOLDER_SUFFIX, *rest)
    return str(mirrored.with_suffix(MASK_SUFFIX))


def build_mask_index(
    image_paths: Iterable[str], dataset_dir: str, mask_root: str | None = None, unused: Iterable[str] = ()
) -> dict[str, str]:
    """Map every image to its mask and check the mask tree covers the images one to one.

    ``image_paths`` must be every image the dataset uses in the mirrored folders, junk included, and
    ``unused`` the others there (whose masks may be present or not), so that a mask without an image
    is detected as well as an image without a mask.
    """
    mask_of = {path: mask_path_for(path, dataset_dir, mask_root) for path in image_paths}
    mask_folders = sorted({_mask_folder(mask, dataset_dir, mask_root) for mask in mask_of.values()})
    for folder in mask_folders:
        if not os.path.isdir(folder):
            raise DatasetNotFoundError(f"mask folder not found: {folder}")

    expected = set(mask_of.values())
    on_disk = {str(path) for folder in mask_folders for path in Path(folder).rglob("*" + MASK_SUFFIX)}
    missing = sorted(expected - on_disk)
    if missing:
        raise DatasetNotFoundError(f"{len(missing)} image(s) have no mask, first: {missing[0]}")
    orphans = sorted(on_disk - expected - {mask_path_for(path, dataset_dir, mask_root) for path in unused})
    if orphans:
        raise DatasetError(
            f"{len(orphans)} mask(s) have no image, first: {orphans[0]} (the mask tree does not mirror the image tree)"
        )
    return mask_of


def _mask_folder(mask_path: str, dataset_dir: str, mask_root: str | None) -> str:
    base = mask_root or dataset_dir
    top = Path(os.path.relpath(mask_path, base)).parts[0]
    return os.path.join(base, top)
