"""Reading the files of the published layouts: image names (Market-style, ``<pid>_<nn>``), the
MSMT17 list files and the synthetic set's manifest. Every error names the file or folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from .errors import DatasetError, DatasetNotFoundError
from .records import ImageRecord

JUNK_PID = -1
SYNTHETIC_MANIFEST = "synthetic.json"
MSMT17_CAMERAS = 15

# Numbers in file names are ASCII digits: str.isdigit and \d also accept characters int() refuses.
INTEGER = re.compile(r"-?[0-9]+")
# Market-style name: pid (may be -1) then "_c" and the 1-based camera (Market-1501, DukeMTMC-reID, CUHK03-NP).
# All its digits: torchreid's and fast-reid's one-digit pattern reads c12 as camera 1 (the same for
# these datasets, whose cameras are one digit; a range error here for a copy with more cameras).
MARKET_NAME = re.compile(r"(-?[0-9]+)_c([0-9]+)")
# Occluded-REID / Partial-REID name: <pid>_<nn>.<ext>
PID_INDEX_NAME = re.compile(r"([0-9]+)_([0-9]+)$")

MARKET_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
MARKET_MULTI_QUERY_FOLDER = "gt_bbox"


def find_dataset_dir(root: str, candidates: Iterable[str], required: Iterable[str], title: str) -> str:
    """First of ``root/<candidate>`` that contains every ``required`` entry."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"{title}: dataset root not found: {root}")
    required = list(required)
    tried = []
    for candidate in candidates:
        folder = os.path.normpath(os.path.join(root, candidate))
        if not os.path.isdir(folder):
            tried.append(folder)
            continue
        missing = [name for name in required if not os.path.exists(os.path.join(folder, name))]
        if not missing:
            return folder
        tried.append(f"{folder} (lacks {', '.join(missing)})")
    raise DatasetNotFoundError(
        f"{title}: no folder with {', '.join(required)} under {root}; looked at: " + "; ".join(tried)
    )


def list_images(folder: str, suffix: str, recursive: bool = False) -> list[str]:
    if not os.path.isdir(folder):
        raise DatasetNotFoundError(f"folder not found: {folder}")
    pattern = f"**/*{suffix}" if recursive else f"*{suffix}"
    paths = sorted(str(p) for p in Path(folder).glob(pattern) if p.is_file())
    if not paths:
        raise DatasetError(f"no *{suffix} images in {folder}")
    return paths


def check_camera(path: str, camera: int, num_cams: int) -> int:
    """1-based camera from a filename -> 0-based index, rejecting cameras outside the dataset."""
    if not 1 <= camera <= num_cams:
        raise DatasetError(f"camera c{camera} outside 1..{num_cams} in {path} (wrong dataset layout?)")
    return camera - 1


def parse_market_folder(folder: str, suffix: str, num_cams: int) -> list[ImageRecord]:
    """Every image of a Market-style folder, junk included, with 0-based camids."""
    records = []
    for path in list_images(folder, suffix):
        match = MARKET_NAME.match(os.path.basename(path))
        if match is None:
            raise DatasetError(f"filename does not match <pid>_c<camera>...: {path}")
        pid, camera = int(match.group(1)), int(match.group(2))
        if pid < JUNK_PID:
            raise DatasetError(f"negative pid other than -1 in {path}")
        records.append(ImageRecord(path, pid, check_camera(path, camera, num_cams)))
    return records


def parse_pid_index_folder(folder: str, suffix: str, camid: int, per_identity_dirs: bool) -> list[ImageRecord]:
    """Images named ``<pid>_<nn><suffix>``; the camera is fixed by the folder, never by ``nn``
    (fast-reid's Occluded-/Partial-REID loaders parse ``nn`` as the camera, so Market-style
    evaluation then drops gallery images whose index equals the query's)."""
    records = []
    for path in list_images(folder, suffix, recursive=per_identity_dirs):
        relative = Path(os.path.relpath(path, folder))
        match = PID_INDEX_NAME.match(relative.stem)
        if match is None:
            raise DatasetError(f"filename does not match <pid>_<nn>{suffix}: {path}")
        pid = int(match.group(1))
        if per_identity_dirs and (
            len(relative.parts) != 2 or not INTEGER.fullmatch(relative.parts[0]) or int(relative.parts[0]) != pid
        ):
            raise DatasetError(f"expected <pid>/<pid>_<nn>{suffix}, got {path}")
        records.append(ImageRecord(path, pid, camid))
    return records


def parse_msmt_list(list_path: str, image_dir: str) -> list[ImageRecord]:
    """Lines ``<pid folder>/<pid>_<index>_<camera>_<date+time>_..._.jpg <pid>``, camera 1-15."""
    if not os.path.isfile(list_path):
        raise DatasetNotFoundError(f"MSMT17 list file not found: {list_path}")
    records = []
    with open(list_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            parts = os.path.basename(fields[0]).split("_") if len(fields) == 2 else []
            if len(parts) < 3 or not INTEGER.fullmatch(fields[1]) or not INTEGER.fullmatch(parts[2]):
                raise DatasetError(f"{list_path}:{line_number}: expected '<relative path> <pid>', got {line.strip()!r}")
            path = os.path.join(image_dir, fields[0])
            if not os.path.isfile(path):
                raise DatasetNotFoundError(f"{list_path}:{line_number}: image not found: {path}")
            records.append(ImageRecord(path, int(fields[1]), check_camera(path, int(parts[2]), MSMT17_CAMERAS)))
    if not records:
        raise DatasetError(f"MSMT17 list file is empty: {list_path}")
    return records


def read_synthetic_manifest(dataset_dir: str) -> dict:
    path = os.path.join(dataset_dir, SYNTHETIC_MANIFEST)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise DatasetNotFoundError(
            f"not a synthetic dataset, {path} is missing (generate one with `dpm-reid synth --out DIR`)"
        ) from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"corrupt synthetic manifest {path}: {error}") from error
