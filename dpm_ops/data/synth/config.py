"""The options of the synthetic set: :class:`SynthConfig`, which checks every field itself."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from dpm_ops.ops._checks import is_finite_real, is_integer, quote


class SynthOptionError(ValueError):
    """A :class:`SynthConfig` field is out of range; ``option`` names the field."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def _check_int(name: str, value, low: int, high: Optional[int], why: str = "") -> None:
    if not is_integer(value) or value < low or (high is not None and value > high):
        wanted = f"in {low}..{high}" if high is not None else f">= {low}"
        raise SynthOptionError(name, f"must be an integer {wanted}{f' ({why})' if why else ''}, got {quote(value)}")


def _plain(value):
    """A checked option as Python's own int / float (numpy's too), lists and tuples element by element."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if is_integer(value):
        return int(value)
    return float(value) if isinstance(value, np.floating) else value


def _check_int_range(name: str, value, low: int, high: Optional[int]) -> None:
    if not (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(map(is_integer, value))
        and low <= value[0] <= value[1]
        and (high is None or value[1] <= high)
    ):
        bound = f" <= {high}" if high is not None else ""
        raise SynthOptionError(name, f"must be integers LOW,HIGH with {low} <= LOW <= HIGH{bound}, got {quote(value)}")


def _check_float(name: str, value, wanted: str, ok) -> None:
    if not is_finite_real(value) or not ok(value):
        raise SynthOptionError(name, f"must be {wanted}, got {quote(value)}")


MAX_WIDTH, MAX_HEIGHT = 512, 1024
MAX_TRAIN_IMAGES = 200  # per train identity (Market-1501's most is 72)
MAX_GALLERY_PER_CAMERA = 50  # per test identity and camera
MAX_SHARE = 10.0  # distractors / junk, in identities' gallery images
MAX_IMAGES = 500_000  # the whole set (Market-1501 has 33k, MSMT17 126k)
DEFAULT_ID_CAMERAS = (2, 4)  # cameras each identity appears in, where the set has as many


def _option(default, help: str):
    """A field that is also a ``dpm-reid synth`` option; ``help`` is its help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Size and difficulty of the synthetic set (defaults: ~6.5k images in about a minute).

    The fields made with :func:`_option` are the command line's options (:mod:`.cli` builds its
    parser from them); the others are reached through the API and the config file only.
    """

    seed: int = _option(0, "random seed; same seed, same bytes")
    # half train, half test: Market-style disjoint ids
    ids: int = _option(600, "identities in all, half train / half test")
    cameras: int = _option(6, "number of cameras, 2-9")
    width: int = _option(128, "image width")
    height: int = _option(256, "image height")
    train_images: tuple[int, int] = _option((6, 12), "images per train identity")  # inclusive range
    # cameras each identity appears in; None: (2, 4) capped at the set's cameras (cameras=3 alone is a valid set)
    id_cameras: Optional[tuple[int, int]] = None
    # at most one query per (id, camera), as in Market
    queries_per_id: int = _option(2, "queries per test identity, one per camera it appears in at most")
    gallery_per_camera: tuple[int, int] = _option((1, 3), "gallery images per test identity and camera")
    distractors: float = _option(0.1, "pid 0 gallery images, as a share of the identities' gallery images")
    # badly framed boxes, dropped by the loader
    junk: float = _option(0.03, "pid -1 (junk) gallery images, same unit")
    query_occlusion: float = _option(0.75, "share of occluded queries")  # per image, a probability
    gallery_occlusion: float = _option(0.15, "share of occluded gallery images")
    train_occlusion: float = _option(0.2, "share of occluded train images")
    hidden_range: tuple[float, float] = (0.25, 0.6)  # fraction of the body an occluder hides
    supersample: int = 2  # draw at this factor, then downsample (anti-aliasing)
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # every rule names the field it checks: the config reports dataset.synth.<field>, the
        # command line --<field>
        _check_int("seed", self.seed, 0, None, "a non-negative seed")
        _check_int("ids", self.ids, 2, 4999, "one train and one test identity; 4-digit pids")
        _check_int("cameras", self.cameras, 2, 9, "Market names hold one camera digit")
        if self.id_cameras is None:
            low, high = DEFAULT_ID_CAMERAS
            object.__setattr__(self, "id_cameras", (low, min(high, int(self.cameras))))
        # upper bounds keep a typo from asking for gigabytes: every camera's background is
        # 2 * width * supersample by height * supersample, and JPEG stops at 65535 anyway
        _check_int("width", self.width, 16, MAX_WIDTH, "re-ID person crops are small")
        _check_int("height", self.height, 32, MAX_HEIGHT, "re-ID person crops are small")
        _check_int("supersample", self.supersample, 1, 4)
        _check_int("jpeg_quality", self.jpeg_quality, 1, 100, "PIL's JPEG quality")
        _check_int_range("id_cameras", self.id_cameras, 2, self.cameras)
        # more were cut to an identity's cameras silently (--cameras 9 --queries-per-id 9 wrote 4 per identity)
        why = f"at most one query per (id, camera), an identity in at most id_cameras[1] = {self.id_cameras[1]} cameras"
        _check_int("queries_per_id", self.queries_per_id, 1, self.id_cameras[1], why)
        for name, high in (("train_images", MAX_TRAIN_IMAGES), ("gallery_per_camera", MAX_GALLERY_PER_CAMERA)):
            # every query needs a true match in the gallery
            _check_int_range(name, getattr(self, name), 1, high)
        share = f"a finite non-negative share <= {MAX_SHARE:g}"
        for name in ("distractors", "junk"):
            _check_float(name, getattr(self, name), share, lambda v: 0 <= v <= MAX_SHARE)
        for name in ("query_occlusion", "gallery_occlusion", "train_occlusion"):
            _check_float(name, getattr(self, name), "a probability in [0, 1]", lambda v: 0 <= v <= 1)
        if self.max_images() > MAX_IMAGES:  # each option within bounds, all of them together too much
            raise SynthOptionError(
                "ids",
                f"with these options the set may hold up to {self.max_images():,} images, more than "
                f"{MAX_IMAGES:,}: lower ids, train_images, gallery_per_camera, distractors or junk",
            )
        hidden = self.hidden_range
        if not (
            isinstance(hidden, (tuple, list))
            and len(hidden) == 2
            and all(is_finite_real(v) for v in hidden)
            and 0.0 < hidden[0] < hidden[1] < 1.0
        ):
            raise SynthOptionError("hidden_range", f"must satisfy 0 < low < high < 1, got {quote(hidden)}")
        # numpy numbers pass the checks but not json.dumps: the manifest write failed after every image was drawn
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _plain(getattr(self, field.name)))

    def max_images(self) -> int:
        """The most images the set can hold (the plan draws the counts inside these ranges)."""
        train_ids, test_ids = (self.ids + 1) // 2, self.ids // 2
        identity_gallery = test_ids * self.id_cameras[1] * self.gallery_per_camera[1]
        queries = test_ids * self.queries_per_id
        return int(train_ids * self.train_images[1] + queries + identity_gallery * (1 + self.distractors + self.junk))

    def to_json(self) -> dict:
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }


def synth_config(options: dict) -> SynthConfig:
    """A SynthConfig from config-file or command-line options (YAML lists for the tuple fields)."""
    return SynthConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in options.items()})
