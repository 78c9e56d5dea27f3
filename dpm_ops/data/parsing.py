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


def check_folder(path: str, what: str = "folder") -> None:
    """DatasetNotFoundError unless ``path`` is a folder, saying whether it is missing or a file."""
    if not os.path.isdir(path):
        found = "is a file, not a folder" if os.path.exists(path) else "not found"
        raise DatasetNotFoundError(f"{what} {found}: {path}")


def find_dataset_dir(root: str, candidates: Iterable[str], required: Iterable[str], title: str) -> str:
    """First of ``root/<candidate>`` that contains every ``required`` entry."""
    root = os.path.abspath(os.path.expanduser(str(root)))
    check_folder(root, f"{title}: dataset root")
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


# A layout's image extension also stands for these, in any case: .JPG and .jpeg files were left out of a
# Market split silently (its pattern was the case-sensitive *.jpg).
EXTENSION_ALIASES = {".jpg": (".jpg", ".jpeg"), ".tif": (".tif", ".tiff")}


def list_images(folder: str, suffix: str, recursive: bool = False) -> list[str]:
    """The images of ``folder`` (and of its sub-folders with ``recursive``) with the extension ``suffix`` or
    its alias, in any case, sorted. A link to nothing and a folder that cannot be read are errors: both
    were skipped, their images silently left out."""
    check_folder(folder)
    extensions = EXTENSION_ALIASES.get(suffix.lower(), (suffix.lower(),))

    def unreadable(error: OSError):
        raise DatasetError(f"cannot read the folder {error.filename}: {error.strerror}") from error

    paths = []
    for directory, subfolders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        if not recursive:
            subfolders.clear()
        for name in files:
            path = os.path.join(directory, name)
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            if not os.path.exists(path):
                raise DatasetNotFoundError(f"image {path} is a link to {os.readlink(path)}, which does not exist")
            paths.append(path)
    if not paths:
        raise DatasetError(f"no *{suffix} images in {folder}")
    return sorted(paths)


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
    """Lines ``<pid folder>/<pid>_<index>_<camera>_<date+time>_..._.jpg <pid>``, camera 1-15: the label the
    name's pid (>= 0, and the folder's), each image listed once, its path relative to ``image_dir``. A list
    that broke one of these had images take another identity, or count twice, silently."""
    if not os.path.isfile(list_path):
        found = "is a folder, not a file" if os.path.isdir(list_path) else "not found"
        raise DatasetNotFoundError(f"MSMT17 list file {found}: {list_path}")
    try:  # utf-8-sig: a byte-order mark (Notepad's) was read as part of the first path
        with open(list_path, encoding="utf-8-sig") as handle:
            lines = handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(f"{list_path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    records, first_line = [], {}
    for line_number, line in enumerate(lines, start=1):
        where = f"{list_path}:{line_number}"
        if not line.strip():
            continue
        fields = line.split()
        parts = os.path.basename(fields[0]).split("_") if len(fields) == 2 else []
        if len(parts) < 3 or not all(INTEGER.fullmatch(value) for value in (fields[1], parts[0], parts[2])):
            raise DatasetError(f"{where}: expected '<relative path> <pid>', got {line.strip()!r}")
        relative, pid = fields[0], int(fields[1])
        folders = Path(relative).parts[:-1]
        if os.path.isabs(relative) or ".." in folders:
            raise DatasetError(f"{where}: the image path must lie under {image_dir}, got {relative!r}")
        folder_pid = int(folders[-1]) if folders and INTEGER.fullmatch(folders[-1]) else pid
        if pid < 0 or int(parts[0]) != pid or folder_pid != pid:
            raise DatasetError(f"{where}: the label {pid} must be the image's pid (>= 0, its name's and folder's)")
        if relative in first_line:
            raise DatasetError(f"{where}: {relative} is listed twice (first on line {first_line[relative]})")
        first_line[relative] = line_number
        path = os.path.join(image_dir, relative)
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"{where}: image not found: {path}")
        records.append(ImageRecord(path, pid, check_camera(path, int(parts[2]), MSMT17_CAMERAS)))
    if not records:
        raise DatasetError(f"MSMT17 list file is empty: {list_path}")
    return records


def read_json(path: str, what: str, missing_hint: str = "") -> object:
    """The JSON file ``path`` (``what`` names it in errors: missing, not JSON, unreadable)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise DatasetNotFoundError(f"{what} not found: {path}{missing_hint}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"corrupt {what} {path}: {error}") from error
    except OSError as error:  # a folder of that name, an unreadable file
        raise DatasetError(f"cannot read the {what} {path}: {error.strerror}") from error


def read_synthetic_manifest(dataset_dir: str) -> dict:
    hint = " (not a synthetic dataset: generate one with `dpm-reid synth --out DIR`)"
    return read_json(os.path.join(dataset_dir, SYNTHETIC_MANIFEST), "synthetic manifest", hint)
