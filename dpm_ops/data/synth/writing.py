"""Rendering the planned images and writing the set (images, masks, manifest) atomically."""

from __future__ import annotations

import dataclasses
import fcntl
import glob
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from ..errors import DatasetError
from ..masks import MASK_FOLDER_SUFFIX
from ..parsing import MARKET_FOLDERS, SYNTHETIC_MANIFEST, read_synthetic_manifest
from .config import SynthConfig
from .drawing import Appearance, Pose, draw_person, random_appearance, random_pose
from .planning import STREAM_CAMERA, STREAM_IDENTITY, STREAM_IMAGE, Job, plan_images, split_counts
from .scene import OCCLUDER_KINDS, Camera, draw_occluder, make_camera

MANIFEST_FORMAT = "dpm_ops.synthetic/1"


def _occlude(person_alpha: np.ndarray, pose: Pose, rng: np.random.Generator, config: SynthConfig, size: tuple):
    """Pick an occluder hiding a fraction of the body inside ``hidden_range`` (best of a few tries)."""
    body = max(1, int(person_alpha.sum()))
    low, high = config.hidden_range
    best = None
    for _ in range(8):
        kind = str(rng.choice(OCCLUDER_KINDS, p=[0.3, 0.2, 0.1, 0.15, 0.25]))
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        draw_occluder(layer, kind, pose, rng)
        covered = np.asarray(layer.getchannel("A")) > 127
        hidden = float((person_alpha & covered).sum()) / body
        error = 0.0 if low <= hidden <= high else min(abs(hidden - low), abs(hidden - high))
        if best is None or error < best[0]:
            best = (error, layer, kind, hidden)
        if error == 0.0:
            break
    return best[1], best[2], best[3]


def _render(job: Job, config: SynthConfig, identities: list[Appearance], cameras: list[Camera]):
    """Draw one image; returns (RGB image, binary mask, occlusion record or None)."""
    rng = np.random.default_rng([config.seed, STREAM_IMAGE, *job.name.encode("utf-8")])
    factor = config.supersample
    size = (config.width * factor, config.height * factor)
    camera = cameras[job.camera]
    look = identities[job.identity] if job.identity >= 0 else random_appearance(rng)
    pose = random_pose(rng, size[0], size[1], camera.person_scale, look.stature)
    if job.junk:  # a badly framed detection: the person half out of the box
        shift = rng.choice([-1, 1]) * size[0] * rng.uniform(0.35, 0.55)
        pose = dataclasses.replace(pose, centre_x=pose.centre_x + shift, top=pose.top + size[1] * rng.uniform(0.0, 0.3))

    offset = int(rng.integers(0, camera.background.width - size[0] + 1))
    canvas = camera.background.crop((offset, 0, offset + size[0], size[1])).convert("RGBA")
    person = Image.new("RGBA", size, (0, 0, 0, 0))
    draw_person(person, look, pose)
    visible = np.asarray(person.getchannel("A")) > 127
    canvas.alpha_composite(person)

    occlusion = None
    if job.occluded:
        layer, kind, hidden = _occlude(visible, pose, rng, config, size)
        canvas.alpha_composite(layer)
        visible = visible & ~(np.asarray(layer.getchannel("A")) > 127)
        if hidden >= 0.05:
            occlusion = {"occluder": kind, "hidden": round(hidden, 3)}

    image = canvas.convert("RGB").reduce(factor)
    mask = Image.fromarray(visible.astype(np.uint8) * 255).reduce(factor).point(lambda v: 255 if v >= 128 else 0)
    if camera.blur > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur))
    pixels = np.asarray(image, dtype=np.float32)
    gain = camera.gain * camera.brightness * rng.uniform(0.9, 1.1)
    pixels = pixels * gain + rng.normal(0.0, camera.noise, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, mask.convert("1"), occlusion


def _identities_and_cameras(config: SynthConfig, pids: list[int]) -> tuple[list[Appearance], list[Camera]]:
    """Every identity's appearance and every camera, each from its own stream of the seed."""
    identities = [random_appearance(np.random.default_rng([config.seed, STREAM_IDENTITY, pid])) for pid in pids]
    factor = config.supersample
    cameras = [
        make_camera(
            np.random.default_rng([config.seed, STREAM_CAMERA, c]), config.width * factor, config.height * factor
        )
        for c in range(config.cameras)
    ]
    return identities, cameras


def generate_synthetic_dataset(
    out: str | os.PathLike, config: SynthConfig = SynthConfig(), *, progress: bool = True, force: bool = False
) -> Path:
    """Write the dataset to ``out`` and return its path.

    The set is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a half-written dataset behind. An existing ``out`` is replaced
    only with ``force`` and only if it is empty or itself a synthetic dataset.
    """
    if not str(out):  # Path("") is the current folder
        raise DatasetError("the output folder must be a path, got ''")
    out = Path(out).expanduser().resolve()
    _check_replaceable(out, force)
    jobs, pids = plan_images(config)
    identities, cameras = _identities_and_cameras(config, pids)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _Staging(out)
    except OSError as error:
        blocking = next((parent for parent in out.parents if parent.is_file()), None)  # "File exists" said little
        why = f"{blocking} is a file" if blocking is not None else error.strerror or error
        raise DatasetError(f"cannot create the output folder {out}: {why}") from error
    with staging:
        try:
            _write_set(staging.folder, out, jobs, pids, identities, cameras, config, progress, force)
        except OSError as error:  # a full disk: Pillow's error names no file, the staged one none the user knows
            raise DatasetError(f"writing the synthetic set {out} failed: {error.strerror or error}") from error
    return out


def _check_replaceable(out: Path, force: bool) -> None:
    """A DatasetError unless ``out`` is absent, an empty folder, or (with ``force``) a synthetic set and nothing
    else: --force replaces the set, never what else was put in its folder (a run's checkpoints, say). Checked when
    the generation starts and again when its set replaces ``out`` (what arrived there meanwhile, another
    generation's set too, was deleted)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"output path exists and is not a folder: {out}")
    is_synthetic = (out / SYNTHETIC_MANIFEST).is_file()
    if any(out.iterdir()) and not (force and is_synthetic):
        hint = "pass --force to replace it" if is_synthetic else "it is not a synthetic dataset; choose another --out"
        raise DatasetError(f"output folder is not empty: {out} ({hint})")
    dataset = {SYNTHETIC_MANIFEST, *MARKET_FOLDERS, *(folder + MASK_FOLDER_SUFFIX for folder in MARKET_FOLDERS)}
    others = sorted(entry.name for entry in out.iterdir() if entry.name not in dataset)
    if others:
        raise DatasetError(
            f"output folder {out} holds a synthetic dataset and other files ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); --force replaces only a folder that holds nothing else"
        )


class _Staging:
    """The sibling folder ``.<out>.partial-<id>`` a set is built in, held by a POSIX lock on the file of that name
    + ".lock", taken before the folder exists and given up after it is gone (moved into place, or removed). The
    folders of generations that were killed (their lock free, or none: an older version's) are removed first."""

    def __init__(self, out: Path):
        prefix = f".{out.name[:200]}.partial-"  # cut: 24 more characters made a valid long name too long
        for name in {path.name.removesuffix(".lock") for path in out.parent.glob(glob.escape(prefix) + "*")}:
            _remove_if_abandoned(out.parent / name)
        self.folder = out.parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        self.lock_path = self.folder.with_name(self.folder.name + ".lock")
        self.lock = open(self.lock_path, "x")
        try:
            fcntl.lockf(self.lock, fcntl.LOCK_EX)
            self.folder.mkdir()
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        shutil.rmtree(self.folder, ignore_errors=True)  # gone already once the set is in place
        self.lock_path.unlink(missing_ok=True)
        self.lock.close()


def _remove_if_abandoned(folder: Path) -> None:
    lock_path = folder.with_name(folder.name + ".lock")
    try:
        lock = open(lock_path, "r+")
    except FileNotFoundError:  # no lock: a generation killed by an older version, or between its two removals
        lock = None
    try:
        if lock is not None:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a live generation holds it
        shutil.rmtree(folder, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        if lock is not None:
            lock.close()


def _write_set(
    staging: Path, out: Path, jobs, pids, identities, cameras, config: SynthConfig, progress: bool, force: bool
) -> None:
    """The images, masks and manifest written into ``staging``, which then replaces ``out`` (checked again)."""
    for folder in MARKET_FOLDERS:
        (staging / folder).mkdir()
        (staging / (folder + MASK_FOLDER_SUFFIX)).mkdir()
    occlusion = {}
    for job in tqdm(jobs, desc="synth", unit="img", disable=not progress):
        image, mask, occluded = _render(job, config, identities, cameras)
        image.save(staging / job.folder / job.name, quality=config.jpeg_quality)
        mask.save((staging / (job.folder + MASK_FOLDER_SUFFIX) / job.name).with_suffix(".png"))
        if occluded is not None:
            occlusion[f"{job.folder}/{job.name}"] = occluded
    manifest = {
        "format": MANIFEST_FORMAT,
        "config": config.to_json(),
        "counts": split_counts(jobs, pids),
        "occlusion": dict(sorted(occlusion.items())),
    }
    (staging / SYNTHETIC_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    _check_replaceable(out, force)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def check_synthetic_dataset(
    out: str | os.PathLike, config: SynthConfig, *, option_prefix: str = "", elsewhere: str = "use another folder"
) -> bool:
    """Whether ``out`` holds a synthetic set (False: no manifest there). A set generated with other
    options is a DatasetError naming the folder and each differing option (``option_prefix`` +
    field name); ``elsewhere`` says how to point to another folder. An existing set is never
    regenerated silently: it may be the data of earlier results."""
    out = Path(out).expanduser().resolve()
    if not (out / SYNTHETIC_MANIFEST).is_file():
        return False
    manifest = read_synthetic_manifest(str(out))
    fix = f"{elsewhere}, or delete the folder to generate the requested set there"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise DatasetError(f"corrupt synthetic manifest {out / SYNTHETIC_MANIFEST}: it holds no config; {fix}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(
            f"the synthetic dataset {out} has manifest format {manifest.get('format')!r}, this version writes "
            f"{MANIFEST_FORMAT!r}; {fix}"
        )
    stored, wanted = manifest["config"], config.to_json()
    differences = [
        f"{option_prefix}{key} {wanted.get(key, '(absent)')} requested, {stored.get(key, '(absent)')} there"
        for key in sorted(stored.keys() | wanted.keys())
        if stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise DatasetError(
            f"the synthetic dataset {out} was generated with other options ({'; '.join(differences)}); {fix}"
        )
    return True


def ensure_synthetic_dataset(
    out: str | os.PathLike, config: SynthConfig = SynthConfig(), *, progress: bool = True
) -> Path:
    """Return ``out`` if it already holds the set of this config, generating it if absent; a set of
    another config there is a DatasetError (:func:`check_synthetic_dataset`)."""
    out = Path(out).expanduser().resolve()
    if check_synthetic_dataset(out, config):
        return out
    return generate_synthetic_dataset(out, config, progress=progress)
