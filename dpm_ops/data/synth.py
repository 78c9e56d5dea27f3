"""A synthetic occluded person re-ID dataset, drawn procedurally with Pillow.

The set is written in Market-1501 layout (``bounding_box_train``, ``query``, ``bounding_box_test``
with names like ``0001_c1s1_000151_00.jpg``) plus a MaskReID mask tree (``<folder>_seg/*.png``,
see :mod:`.masks`) and a manifest ``synthetic.json`` (config, split counts, and for every occluded
image the occluder kind and the fraction of the body it hides).

Design, so that occlusion matters:

* identity evidence is spread over the whole body: hair/hat, top colour + texture (stripes,
  checks, dots, two-tone, logo), sleeves, bottom type + colour, shoes and bag each carry part of it,
  so an occluder that hides the legs or the torso removes real evidence;
* nuisance factors vary per camera (background, colour cast, brightness, blur, person scale) and
  per image (view front/back, pose, position, noise), so colour alone does not match exactly;
* occluders (crates/cars/bushes from the ground, pillars and walls from the side, poles, boards,
  other pedestrians in front) hide 25-60% of the body in most queries and some gallery/train
  images; the mask marks only the target's visible pixels (occluders, including people, excluded).

Everything is a function of the seed: each image has its own random stream keyed by
(seed, job number), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from .datasets import MARKET_FOLDERS, SYNTHETIC_MANIFEST, read_synthetic_manifest
from .errors import DatasetError
from .masks import MASK_FOLDER_SUFFIX

MANIFEST_FORMAT = "dpm_ops.synthetic/1"
OCCLUDER_KINDS = ("ground", "side", "pole", "board", "person")

# independent random streams derived from the seed
_STREAM_PLAN, _STREAM_CAMERA, _STREAM_IDENTITY, _STREAM_IMAGE = range(4)


class SynthOptionError(ValueError):
    """A :class:`SynthConfig` field is out of range; ``option`` names the field."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _check_int(name: str, value, low: int, high: Optional[int], why: str = "") -> None:
    if not _is_int(value) or value < low or (high is not None and value > high):
        wanted = f"in {low}..{high}" if high is not None else f">= {low}"
        raise SynthOptionError(name, f"must be an integer {wanted}{f' ({why})' if why else ''}, got {value!r}")


def _check_int_range(name: str, value, low: int, high: Optional[int]) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_int, value))
            and low <= value[0] <= value[1] and (high is None or value[1] <= high)):
        bound = f" <= {high}" if high is not None else ""
        raise SynthOptionError(name, f"must be integers LOW,HIGH with {low} <= LOW <= HIGH{bound}, got {value!r}")


def _check_float(name: str, value, wanted: str, ok) -> None:
    if not _is_real(value) or not ok(value):
        raise SynthOptionError(name, f"must be {wanted}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Size and difficulty of the synthetic set (defaults: ~6.5k images in about a minute)."""

    seed: int = 0
    ids: int = 600  # identities in all; half train, half test (Market-style disjoint ids)
    cameras: int = 6
    width: int = 128
    height: int = 256
    train_images: tuple[int, int] = (6, 12)  # per train identity, inclusive range
    id_cameras: tuple[int, int] = (2, 4)  # cameras each identity appears in
    queries_per_id: int = 2  # at most one query per (id, camera), as in Market
    gallery_per_camera: tuple[int, int] = (1, 3)  # gallery images per (test id, camera)
    distractors: float = 0.1  # pid 0 gallery images of outsiders, as a share of the id gallery
    junk: float = 0.03  # pid -1 badly framed gallery images (dropped by the loader), same unit
    query_occlusion: float = 0.75  # probability that an image is occluded, per split
    gallery_occlusion: float = 0.15
    train_occlusion: float = 0.2
    hidden_range: tuple[float, float] = (0.25, 0.6)  # fraction of the body an occluder hides
    supersample: int = 2  # draw at this factor, then downsample (anti-aliasing)
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        # every rule names the field it checks: the config reports dataset.synth.<field>, the
        # command line --<field>
        _check_int("seed", self.seed, 0, None, "a non-negative seed")
        _check_int("ids", self.ids, 2, 4999, "one train and one test identity; 4-digit pids")
        _check_int("cameras", self.cameras, 2, 9, "Market names hold one camera digit")
        _check_int("width", self.width, 16, None, "images must be at least 16 wide")
        _check_int("height", self.height, 32, None, "images must be at least 32 high")
        _check_int("queries_per_id", self.queries_per_id, 1, None)
        _check_int("supersample", self.supersample, 1, None)
        _check_int("jpeg_quality", self.jpeg_quality, 1, 100, "PIL's JPEG quality")
        _check_int_range("id_cameras", self.id_cameras, 2, self.cameras)
        for name in ("train_images", "gallery_per_camera"):  # every query needs a true match in the gallery
            _check_int_range(name, getattr(self, name), 1, None)
        for name in ("distractors", "junk"):
            _check_float(name, getattr(self, name), "a finite non-negative share", lambda v: v >= 0)
        for name in ("query_occlusion", "gallery_occlusion", "train_occlusion"):
            _check_float(name, getattr(self, name), "a probability in [0, 1]", lambda v: 0 <= v <= 1)
        hidden = self.hidden_range
        if not (isinstance(hidden, (tuple, list)) and len(hidden) == 2 and all(_is_real(v) for v in hidden)
                and 0.0 < hidden[0] < hidden[1] < 1.0):
            raise SynthOptionError("hidden_range", f"must satisfy 0 < low < high < 1, got {hidden!r}")

    def to_json(self) -> dict:
        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(self).items()
        }


def synth_config(options: dict) -> SynthConfig:
    """A SynthConfig from config-file options (YAML lists for the tuple fields)."""
    return SynthConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in options.items()})


# ---------------------------------------------------------------------------------------------
# appearance


def _hsv(rng: np.random.Generator, saturation=(0.3, 0.95), value=(0.25, 0.95), hue=None) -> tuple[int, int, int]:
    h = rng.uniform(0.0, 1.0) if hue is None else hue % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value))
    return int(r * 255), int(g * 255), int(b * 255)


def _grey(rng: np.random.Generator, low=30, high=220) -> tuple[int, int, int]:
    level = int(rng.integers(low, high))
    return level, level, level


def _garment_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # real clothing has many dark/grey/white garments; keep them, they make matching harder
    return _grey(rng) if rng.random() < 0.25 else _hsv(rng)


SKIN_TONES = ((241, 203, 176), (224, 172, 138), (198, 134, 96), (141, 85, 54), (92, 58, 40))
HAIR_COLOURS = ((20, 16, 14), (60, 40, 25), (110, 75, 40), (185, 150, 90), (150, 150, 150), (120, 40, 25))


@dataclasses.dataclass(frozen=True)
class Appearance:
    """Everything that identifies a person; every body region carries some of it."""

    skin: tuple
    hair: tuple
    hair_style: str  # short | long | cap | hat
    hat: tuple
    top: tuple
    top_second: tuple
    top_pattern: str  # solid | hstripes | vstripes | checks | dots | twotone
    pattern_period: float  # in units of body height
    long_sleeves: bool
    logo: Optional[tuple]  # colour of a chest logo (front view only)
    bottom: tuple
    bottom_style: str  # trousers | shorts | skirt
    bottom_pattern: str  # solid | hstripes | checks
    shoes: tuple
    bag: str  # none | backpack | shoulder | handbag
    bag_colour: tuple
    bag_side: int  # -1 left, +1 right
    build: float  # width factor
    stature: float  # height factor


def random_appearance(rng: np.random.Generator) -> Appearance:
    top = _garment_colour(rng)
    return Appearance(
        skin=SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
        hair=HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))],
        hair_style=str(rng.choice(["short", "long", "cap", "hat"], p=[0.45, 0.3, 0.15, 0.1])),
        hat=_hsv(rng),
        top=top,
        top_second=_garment_colour(rng),
        top_pattern=str(
            rng.choice(
                ["solid", "hstripes", "vstripes", "checks", "dots", "twotone"], p=[0.3, 0.2, 0.1, 0.15, 0.1, 0.15]
            )
        ),
        pattern_period=float(rng.uniform(0.03, 0.07)),
        long_sleeves=bool(rng.random() < 0.5),
        logo=_hsv(rng) if rng.random() < 0.35 else None,
        bottom=_garment_colour(rng),
        bottom_style=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.6, 0.25, 0.15])),
        bottom_pattern=str(rng.choice(["solid", "hstripes", "checks"], p=[0.75, 0.1, 0.15])),
        shoes=_garment_colour(rng),
        bag=str(rng.choice(["none", "backpack", "shoulder", "handbag"], p=[0.35, 0.3, 0.2, 0.15])),
        bag_colour=_garment_colour(rng),
        bag_side=int(rng.choice([-1, 1])),
        build=float(rng.uniform(0.85, 1.15)),
        stature=float(rng.uniform(0.92, 1.04)),
    )


@dataclasses.dataclass(frozen=True)
class Pose:
    """Per-image nuisance: where the person stands, how big, which way they face."""

    centre_x: float
    top: float
    height: float
    back_view: bool
    arm_swing: float  # in units of body height
    stance: float
    squash: float  # horizontal compression for an oblique view


def random_pose(rng: np.random.Generator, canvas_w: int, canvas_h: int, scale: float, stature: float) -> Pose:
    height = canvas_h * scale * stature * rng.uniform(0.95, 1.04)
    bottom_margin = canvas_h * rng.uniform(0.01, 0.04)
    return Pose(
        centre_x=canvas_w * (0.5 + rng.uniform(-0.07, 0.07)),
        top=canvas_h - bottom_margin - height,
        height=height,
        back_view=bool(rng.random() < 0.5),
        arm_swing=float(rng.uniform(-0.04, 0.05)),
        stance=float(rng.uniform(0.0, 0.05)),
        squash=float(rng.uniform(0.82, 1.0)),
    )


# ---------------------------------------------------------------------------------------------
# drawing


def _limb(start: tuple, end: tuple, width_start: float, width_end: float) -> list[tuple]:
    """Quadrilateral along the segment start->end, of the given widths at each end."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / length, dx / length
    return [
        (start[0] + nx * width_start / 2, start[1] + ny * width_start / 2),
        (end[0] + nx * width_end / 2, end[1] + ny * width_end / 2),
        (end[0] - nx * width_end / 2, end[1] - ny * width_end / 2),
        (start[0] - nx * width_start / 2, start[1] - ny * width_start / 2),
    ]


def _pattern_layer(size: tuple, base: tuple, second: tuple, pattern: str, period: float, origin: tuple) -> Image.Image:
    """A canvas-sized texture anchored at ``origin`` so it moves with the person."""
    texture = Image.new("RGB", size, base)
    if pattern == "solid":
        return texture
    draw = ImageDraw.Draw(texture)
    step = max(2.0, period)
    width, height = size
    x0, y0 = origin
    if pattern in ("hstripes", "checks"):
        y = y0 - step * math.ceil(y0 / step)
        while y < height:
            draw.rectangle([0, y, width, y + step / 2], fill=second)
            y += step
    if pattern in ("vstripes", "checks"):
        x = x0 - step * math.ceil(x0 / step)
        while x < width:
            draw.rectangle([x, 0, x + step / 2, height], fill=second)
            x += step
    if pattern == "dots":
        radius = step / 4
        y = y0 - step * math.ceil(y0 / step)
        row = 0
        while y < height:
            x = x0 - step * math.ceil(x0 / step) + (step / 2 if row % 2 else 0)
            while x < width:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=second)
                x += step
            y += step
            row += 1
    if pattern == "twotone":
        draw.rectangle([0, 0, width, y0], fill=second)
    return texture


class _Painter:
    """Paints solid or textured polygons onto an RGBA layer (alpha = coverage)."""

    def __init__(self, layer: Image.Image):
        self.layer = layer
        self.draw = ImageDraw.Draw(layer)

    def polygon(self, points, colour) -> None:
        self.draw.polygon(points, fill=(*colour, 255))

    def ellipse(self, box, colour) -> None:
        self.draw.ellipse(box, fill=(*colour, 255))

    def rectangle(self, box, colour) -> None:
        x0, y0, x1, y1 = box
        self.draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=(*colour, 255))

    def line(self, points, colour, width: float) -> None:
        self.draw.line(points, fill=(*colour, 255), width=max(1, int(round(width))))

    def textured(self, polygons: Sequence[list], texture: Image.Image) -> None:
        # work in the polygons' bounding box only: full-canvas pastes dominate the drawing time
        xs = [x for points in polygons for x, _ in points]
        ys = [y for points in polygons for _, y in points]
        left, top = max(0, int(min(xs))), max(0, int(min(ys)))
        right, bottom = min(self.layer.width, int(max(xs)) + 2), min(self.layer.height, int(max(ys)) + 2)
        if right <= left or bottom <= top:
            return
        shape = Image.new("L", (right - left, bottom - top), 0)
        shape_draw = ImageDraw.Draw(shape)
        for points in polygons:
            shape_draw.polygon([(x - left, y - top) for x, y in points], fill=255)
        patch = texture.crop((left, top, right, bottom)).convert("RGBA")
        self.layer.paste(patch, (left, top), shape)


def draw_person(layer: Image.Image, look: Appearance, pose: Pose) -> None:
    """Draw a pedestrian (head, hair, torso, arms, legs, shoes, bag) onto an RGBA layer."""
    paint = _Painter(layer)
    u = pose.height
    cx, top = pose.centre_x, pose.top
    wide = look.build * pose.squash
    shoulder_y, waist_y, knee_y, ankle_y = top + 0.16 * u, top + 0.50 * u, top + 0.72 * u, top + 0.95 * u
    shoulder_half, waist_half = 0.125 * u * wide, 0.10 * u * wide
    hip_half = 0.105 * u * wide
    leg_width = 0.085 * u * wide
    side = look.bag_side

    # legs and bottom garment
    legs = []
    for sign in (-1, 1):
        hip = (cx + sign * (hip_half - leg_width / 2), waist_y)
        ankle = (cx + sign * (hip_half - leg_width / 2 + pose.stance * u), ankle_y)
        legs.append(_limb(hip, ankle, leg_width, leg_width * 0.75))
    for points in legs:
        paint.polygon(points, look.skin)
    bottom_texture = _pattern_layer(
        layer.size,
        look.bottom,
        tuple(max(0, c - 60) for c in look.bottom),
        look.bottom_pattern,
        look.pattern_period * u,
        (cx, waist_y),
    )
    hip_band = [
        (cx - waist_half, waist_y - 0.01 * u),
        (cx + waist_half, waist_y - 0.01 * u),
        (cx + hip_half, waist_y + 0.09 * u),
        (cx - hip_half, waist_y + 0.09 * u),
    ]
    if look.bottom_style == "trousers":
        paint.textured([*legs, hip_band], bottom_texture)
    elif look.bottom_style == "shorts":
        fraction = (knee_y - waist_y) / (ankle_y - waist_y)
        shorts = [
            [
                p[0],
                (p[0][0] + (p[1][0] - p[0][0]) * fraction, knee_y),
                (p[3][0] + (p[2][0] - p[3][0]) * fraction, knee_y),
                p[3],
            ]
            for p in legs
        ]
        paint.textured([*shorts, hip_band], bottom_texture)
    else:
        flare = 0.16 * u * wide
        paint.textured(
            [
                [
                    (cx - waist_half, waist_y - 0.01 * u),
                    (cx + waist_half, waist_y - 0.01 * u),
                    (cx + flare, knee_y + 0.01 * u),
                    (cx - flare, knee_y + 0.01 * u),
                ]
            ],
            bottom_texture,
        )
    for sign in (-1, 1):
        foot_x = cx + sign * (hip_half - leg_width / 2 + pose.stance * u)
        paint.ellipse(
            [foot_x - 0.045 * u * wide, ankle_y - 0.015 * u, foot_x + 0.045 * u * wide, ankle_y + 0.035 * u], look.shoes
        )

    # torso
    torso = [
        (cx - shoulder_half * 0.8, shoulder_y - 0.01 * u),
        (cx + shoulder_half * 0.8, shoulder_y - 0.01 * u),
        (cx + shoulder_half, shoulder_y + 0.04 * u),
        (cx + waist_half, waist_y + 0.02 * u),
        (cx - waist_half, waist_y + 0.02 * u),
        (cx - shoulder_half, shoulder_y + 0.04 * u),
    ]
    top_texture = _pattern_layer(
        layer.size,
        look.top,
        look.top_second,
        look.top_pattern,
        look.pattern_period * u,
        (cx, shoulder_y + 0.17 * u if look.top_pattern == "twotone" else shoulder_y),
    )
    paint.textured([torso], top_texture)

    # arms: sleeve in the top's texture, the rest skin
    arm_width = 0.06 * u * wide
    for sign in (-1, 1):
        shoulder = (cx + sign * (shoulder_half - arm_width / 3), shoulder_y + 0.03 * u)
        swing = pose.arm_swing if sign > 0 else -pose.arm_swing
        hand = (shoulder[0] + sign * 0.03 * u + swing * u, shoulder_y + 0.36 * u)
        paint.polygon(_limb(shoulder, hand, arm_width, arm_width * 0.8), look.skin)
        sleeve_end = (
            hand
            if look.long_sleeves
            else (shoulder[0] + (hand[0] - shoulder[0]) * 0.4, shoulder[1] + (hand[1] - shoulder[1]) * 0.4)
        )
        paint.textured([_limb(shoulder, sleeve_end, arm_width * 1.1, arm_width * 0.95)], top_texture)
        paint.ellipse([hand[0] - 0.025 * u, hand[1] - 0.02 * u, hand[0] + 0.025 * u, hand[1] + 0.035 * u], look.skin)
        if look.bag == "handbag" and sign == side:
            paint.line([hand, (hand[0], hand[1] + 0.04 * u)], look.bag_colour, 0.01 * u)
            paint.rectangle(
                [hand[0] - 0.05 * u, hand[1] + 0.04 * u, hand[0] + 0.05 * u, hand[1] + 0.12 * u], look.bag_colour
            )

    # bags drawn over the torso
    if look.bag == "backpack":
        if pose.back_view:
            paint.rectangle(
                [cx - shoulder_half * 0.7, shoulder_y + 0.03 * u, cx + shoulder_half * 0.7, waist_y - 0.02 * u],
                look.bag_colour,
            )
        else:
            for sign in (-1, 1):
                x = cx + sign * shoulder_half * 0.55
                paint.line(
                    [(x, shoulder_y - 0.01 * u), (x - sign * 0.01 * u, waist_y - 0.06 * u)], look.bag_colour, 0.025 * u
                )
    elif look.bag == "shoulder":
        strap_top = (cx - side * shoulder_half * 0.6, shoulder_y)
        bag_x = cx + side * (waist_half + 0.03 * u)
        paint.line([strap_top, (bag_x, waist_y - 0.02 * u)], look.bag_colour, 0.018 * u)
        paint.rectangle([bag_x - 0.05 * u, waist_y - 0.03 * u, bag_x + 0.05 * u, waist_y + 0.08 * u], look.bag_colour)
    if look.logo is not None and not pose.back_view:
        paint.ellipse([cx - 0.035 * u, shoulder_y + 0.07 * u, cx + 0.035 * u, shoulder_y + 0.14 * u], look.logo)

    # neck, hair, head, headwear
    head_rx, head_ry, head_cy = 0.05 * u * (0.9 + 0.1 * wide), 0.068 * u, top + 0.075 * u
    head_box = [cx - head_rx, head_cy - head_ry, cx + head_rx, head_cy + head_ry]
    paint.rectangle([cx - 0.025 * u, head_cy + 0.04 * u, cx + 0.025 * u, shoulder_y + 0.005 * u], look.skin)
    if look.hair_style == "long":
        paint.rectangle(
            [cx - head_rx * 1.05, head_cy, cx + head_rx * 1.05, shoulder_y + (0.1 if pose.back_view else 0.03) * u],
            look.hair,
        )
    paint.ellipse(head_box, look.hair if pose.back_view else look.skin)
    if look.hair_style in ("short", "long"):
        paint.draw.chord(
            [head_box[0] - 0.004 * u, head_box[1] - 0.006 * u, head_box[2] + 0.004 * u, head_box[3]],
            180,
            360,
            fill=(*look.hair, 255),
        )
    else:
        paint.draw.chord(
            [head_box[0] - 0.006 * u, head_box[1] - 0.01 * u, head_box[2] + 0.006 * u, head_box[3] - 0.02 * u],
            180,
            360,
            fill=(*look.hat, 255),
        )
        if look.hair_style == "hat":
            paint.rectangle([cx - head_rx * 1.5, head_cy - 0.02 * u, cx + head_rx * 1.5, head_cy - 0.005 * u], look.hat)
        else:
            visor = -1 if pose.back_view else 1
            paint.rectangle(
                [cx - head_rx * 0.2 * visor, head_cy - 0.02 * u, cx + head_rx * 1.4 * visor, head_cy - 0.005 * u],
                look.hat,
            )


def _textured_block(size: tuple, rng: np.random.Generator) -> Image.Image:
    """The surface of a ground occluder: a crate, a car or a bush."""
    kind = rng.choice(["crate", "car", "bush"])
    if kind == "crate":
        base = (int(rng.integers(120, 190)), int(rng.integers(80, 130)), int(rng.integers(40, 80)))
        texture = _pattern_layer(
            size, base, tuple(int(c * 0.75) for c in base), "hstripes", float(rng.uniform(8, 20)), (0, 0)
        )
    elif kind == "car":
        texture = Image.new("RGB", size, _hsv(rng, value=(0.3, 0.9)))
    else:
        texture = Image.new(
            "RGB", size, (int(rng.integers(20, 60)), int(rng.integers(70, 130)), int(rng.integers(20, 60)))
        )
        draw = ImageDraw.Draw(texture)
        for _ in range(40):
            x, y, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(3, 10)
            draw.ellipse(
                [x - r, y - r, x + r, y + r],
                fill=(int(rng.integers(20, 80)), int(rng.integers(90, 160)), int(rng.integers(20, 70))),
            )
    return texture


def draw_occluder(layer: Image.Image, kind: str, pose: Pose, rng: np.random.Generator) -> None:
    """Draw one occluder of ``kind`` in front of the person described by ``pose``."""
    paint = _Painter(layer)
    width, height = layer.size
    u = pose.height
    half_body = 0.14 * u
    if kind == "ground":  # crate / car / bush standing on the ground, hiding the lower body
        cover = rng.uniform(0.3, 0.65)
        left = pose.centre_x - half_body * rng.uniform(1.2, 3.0)
        right = pose.centre_x + half_body * rng.uniform(1.2, 3.0)
        box = [left, pose.top + u * (1 - cover), right, height]
        shape = Image.new("L", layer.size, 0)
        ImageDraw.Draw(shape).rounded_rectangle(box, radius=u * 0.03, fill=255)
        layer.paste(_textured_block(layer.size, rng), (0, 0), shape)
    elif kind == "side":  # wall edge, pillar or doorway entering from one side
        cover = rng.uniform(0.3, 0.7)
        if rng.random() < 0.5:
            paint.rectangle([0, 0, pose.centre_x - half_body + 2 * half_body * cover, height], _grey(rng, 60, 200))
        else:
            paint.rectangle([pose.centre_x + half_body - 2 * half_body * cover, 0, width, height], _grey(rng, 60, 200))
    elif kind == "pole":  # one or two thick poles / tree trunks
        for _ in range(int(rng.integers(1, 3))):
            x = pose.centre_x + rng.uniform(-0.8, 0.8) * half_body
            half = rng.uniform(0.15, 0.35) * half_body
            paint.rectangle([x - half, 0, x + half, height], _hsv(rng, saturation=(0.0, 0.4), value=(0.2, 0.6)))
    elif kind == "board":  # sign, umbrella or railing across the torso or the legs
        centre = pose.top + u * rng.uniform(0.25, 0.75)
        half = u * rng.uniform(0.1, 0.2)
        paint.rectangle([0, centre - half, width, centre + half], _hsv(rng, value=(0.4, 0.95)))
    elif kind == "person":  # another pedestrian passing in front
        look = random_appearance(rng)
        offset = rng.choice([-1, 1]) * rng.uniform(0.5, 1.1) * 2 * half_body
        grow = rng.uniform(1.0, 1.15)
        other = Pose(
            centre_x=pose.centre_x + offset,
            top=pose.top + u * (1 - grow) + u * rng.uniform(0.0, 0.08),
            height=u * grow,
            back_view=bool(rng.random() < 0.5),
            arm_swing=float(rng.uniform(-0.04, 0.05)),
            stance=float(rng.uniform(0.0, 0.05)),
            squash=float(rng.uniform(0.85, 1.0)),
        )
        draw_person(layer, look, other)
    else:
        raise ValueError(f"unknown occluder kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# cameras and backgrounds


@dataclasses.dataclass(frozen=True)
class Camera:
    background: Image.Image  # twice the canvas width; each image crops a random window
    gain: np.ndarray  # per-channel colour cast
    brightness: float
    person_scale: float  # body height / image height
    blur: float  # Gaussian blur radius at the output size
    noise: float  # sensor noise sigma, 0-255 scale


def _make_camera(rng: np.random.Generator, canvas_w: int, canvas_h: int) -> Camera:
    background = Image.new("RGB", (canvas_w * 2, canvas_h), _hsv(rng, saturation=(0.05, 0.4), value=(0.35, 0.85)))
    draw = ImageDraw.Draw(background)
    horizon = int(canvas_h * rng.uniform(0.45, 0.7))
    wall_style = rng.choice(["bricks", "panels", "windows", "plain"])
    wall = _hsv(rng, saturation=(0.05, 0.5), value=(0.3, 0.9))
    draw.rectangle([0, 0, canvas_w * 2, horizon], fill=wall)
    darker = tuple(int(c * 0.8) for c in wall)
    if wall_style == "bricks":
        brick_h = canvas_h * rng.uniform(0.03, 0.06)
        brick_w = brick_h * 2.5
        for row in range(int(horizon / brick_h) + 1):
            y = row * brick_h
            draw.line([(0, y), (canvas_w * 2, y)], fill=darker, width=2)
            shift = brick_w / 2 if row % 2 else 0
            for col in range(int(canvas_w * 2 / brick_w) + 2):
                x = col * brick_w + shift
                draw.line([(x, y), (x, y + brick_h)], fill=darker, width=2)
    elif wall_style == "panels":
        step = canvas_w * rng.uniform(0.2, 0.5)
        for col in range(int(canvas_w * 2 / step) + 1):
            draw.rectangle([col * step, 0, col * step + step * 0.1, horizon], fill=darker)
    elif wall_style == "windows":
        for _ in range(int(rng.integers(3, 8))):
            x, y = rng.uniform(0, canvas_w * 2), rng.uniform(0, horizon * 0.8)
            w, h = canvas_w * rng.uniform(0.15, 0.4), horizon * rng.uniform(0.1, 0.25)
            draw.rectangle([x, y, x + w, y + h], fill=_hsv(rng, saturation=(0.0, 0.3), value=(0.15, 0.9)))
    ground = _hsv(rng, saturation=(0.0, 0.35), value=(0.25, 0.7))
    draw.rectangle([0, horizon, canvas_w * 2, canvas_h], fill=ground)
    ground_style = rng.choice(["tiles", "road", "grass"])
    line = tuple(int(c * 0.75) for c in ground)
    if ground_style == "tiles":
        step = canvas_h * rng.uniform(0.05, 0.1)
        for row in range(int((canvas_h - horizon) / step) + 1):
            draw.line([(0, horizon + row * step), (canvas_w * 2, horizon + row * step)], fill=line, width=2)
        for col in range(int(canvas_w * 2 / step) + 1):
            draw.line([(col * step, horizon), (col * step, canvas_h)], fill=line, width=2)
    elif ground_style == "road":
        y = horizon + (canvas_h - horizon) * rng.uniform(0.3, 0.7)
        for col in range(0, canvas_w * 2, max(4, canvas_w // 3)):
            draw.rectangle([col, y, col + canvas_w // 6, y + canvas_h * 0.012], fill=(230, 230, 210))
    else:
        for _ in range(300):
            x, y = rng.uniform(0, canvas_w * 2), rng.uniform(horizon, canvas_h)
            draw.line(
                [(x, y), (x + rng.uniform(-2, 2), y - canvas_h * 0.015)],
                fill=_hsv(rng, hue=0.3 + rng.uniform(-0.05, 0.05), value=(0.2, 0.6)),
            )
    return Camera(
        background=background,
        gain=rng.uniform(0.8, 1.2, size=3),
        brightness=float(rng.uniform(0.75, 1.15)),
        person_scale=float(rng.uniform(0.8, 0.92)),
        blur=float(rng.uniform(0.0, 0.9)),
        noise=float(rng.uniform(2.0, 7.0)),
    )


# ---------------------------------------------------------------------------------------------
# planning and rendering


@dataclasses.dataclass(frozen=True)
class _Job:
    folder: str  # bounding_box_train | query | bounding_box_test
    name: str
    identity: int  # index into the identity table, -1 for a one-off person (distractor / junk)
    camera: int  # 0-based
    occluded: bool
    junk: bool


def _plan(config: SynthConfig) -> tuple[list[_Job], list[int]]:
    """Decide every image: split, pid, camera, occlusion. Returns the jobs and the pid table."""
    rng = np.random.default_rng([config.seed, _STREAM_PLAN])
    pids = sorted(int(p) for p in rng.choice(np.arange(1, 2 * config.ids + 1), size=config.ids, replace=False))
    order = rng.permutation(config.ids)
    train_ids = sorted(order[: (config.ids + 1) // 2].tolist())
    test_ids = sorted(order[(config.ids + 1) // 2 :].tolist())
    frame = [0] * config.cameras  # strictly increasing per camera, so names never repeat
    jobs: list[_Job] = []

    def name_for(pid: int, camera: int, detection: int) -> str:
        frame[camera] += int(rng.integers(20, 400))
        sequence = 1 + frame[camera] // 25000 % 6
        return f"{pid:04d}_c{camera + 1}s{sequence}_{frame[camera]:06d}_{detection:02d}.jpg"

    def cameras_of_identity() -> list[int]:
        count = int(rng.integers(config.id_cameras[0], config.id_cameras[1] + 1))
        return sorted(rng.choice(config.cameras, size=count, replace=False).tolist())

    for identity in train_ids:
        cams = cameras_of_identity()
        for _ in range(int(rng.integers(config.train_images[0], config.train_images[1] + 1))):
            camera = int(rng.choice(cams))
            jobs.append(
                _Job(
                    "bounding_box_train",
                    name_for(pids[identity], camera, int(rng.integers(1, 6))),
                    identity,
                    camera,
                    bool(rng.random() < config.train_occlusion),
                    False,
                )
            )
    for identity in test_ids:
        cams = cameras_of_identity()
        for camera in rng.permutation(cams)[: config.queries_per_id].tolist():
            jobs.append(
                _Job(
                    "query",
                    name_for(pids[identity], camera, 0),
                    identity,
                    camera,
                    bool(rng.random() < config.query_occlusion),
                    False,
                )
            )
        for camera in cams:
            for _ in range(int(rng.integers(config.gallery_per_camera[0], config.gallery_per_camera[1] + 1))):
                jobs.append(
                    _Job(
                        "bounding_box_test",
                        name_for(pids[identity], camera, int(rng.integers(1, 6))),
                        identity,
                        camera,
                        bool(rng.random() < config.gallery_occlusion),
                        False,
                    )
                )
    identity_gallery = sum(job.folder == "bounding_box_test" for job in jobs)
    for pid, share in ((0, config.distractors), (-1, config.junk)):
        for _ in range(int(round(share * identity_gallery))):
            camera = int(rng.integers(config.cameras))
            name = name_for(0, camera, int(rng.integers(1, 6)))
            if pid < 0:
                name = "-1" + name[4:]
            jobs.append(
                _Job("bounding_box_test", name, -1, camera, bool(rng.random() < config.gallery_occlusion), pid < 0)
            )
    return jobs, pids


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


def _render(job: _Job, config: SynthConfig, identities: list[Appearance], cameras: list[Camera]):
    """Draw one image; returns (RGB image, binary mask, occlusion record or None)."""
    rng = np.random.default_rng([config.seed, _STREAM_IMAGE, *job.name.encode("utf-8")])
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


def generate_synthetic_dataset(
    out: str | os.PathLike, config: SynthConfig = SynthConfig(), *, progress: bool = True, force: bool = False
) -> Path:
    """Write the dataset to ``out`` and return its path.

    The set is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a half-written dataset behind. An existing ``out`` is replaced
    only with ``force`` and only if it is empty or itself a synthetic dataset.
    """
    out = Path(out).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise DatasetError(f"output path exists and is not a folder: {out}")
        is_synthetic = (out / SYNTHETIC_MANIFEST).is_file()
        if any(out.iterdir()) and not (force and is_synthetic):
            hint = (
                "pass --force to replace it" if is_synthetic else "it is not a synthetic dataset; choose another --out"
            )
            raise DatasetError(f"output folder is not empty: {out} ({hint})")

    jobs, pids = _plan(config)
    identities = [random_appearance(np.random.default_rng([config.seed, _STREAM_IDENTITY, pid])) for pid in pids]
    factor = config.supersample
    cameras = [
        _make_camera(
            np.random.default_rng([config.seed, _STREAM_CAMERA, c]), config.width * factor, config.height * factor
        )
        for c in range(config.cameras)
    ]

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise DatasetError(f"cannot create the output folder {out}: {error.strerror or error}") from error
    try:
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
            "counts": _split_counts(jobs, pids),
            "occlusion": dict(sorted(occlusion.items())),
        }
        (staging / SYNTHETIC_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _split_counts(jobs: list[_Job], pids: list[int]) -> dict:
    """(ids, images) per split as the loader sees them: junk dropped, distractors one id (pid 0)."""
    split_of_folder = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}
    counts = {}
    for folder, split in split_of_folder.items():
        kept = [job for job in jobs if job.folder == folder and not job.junk]
        ids = {pids[job.identity] if job.identity >= 0 else 0 for job in kept}
        counts[split] = [len(ids), len(kept)]
    return counts


def ensure_synthetic_dataset(
    out: str | os.PathLike, config: SynthConfig = SynthConfig(), *, progress: bool = True
) -> Path:
    """Return ``out`` if it already holds the set of this config, generating it otherwise."""
    out = Path(out).expanduser().resolve()
    if (out / SYNTHETIC_MANIFEST).is_file():
        manifest = read_synthetic_manifest(str(out))
        if manifest.get("format") == MANIFEST_FORMAT and manifest.get("config") == config.to_json():
            return out
    return generate_synthetic_dataset(out, config, progress=progress, force=True)


# ---------------------------------------------------------------------------------------------
# command line


def _int_range(text: str) -> tuple[int, int]:
    """"N" or "LOW,HIGH"; the values are SynthConfig's to check."""
    low, _, high = text.partition(",")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW,HIGH, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(
        prog="dpm-reid synth",
        description="Generate the synthetic occluded re-ID dataset (Market-1501 layout + masks + synthetic.json).",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (created; must be empty or a synthetic set with --force)"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed; same seed, same bytes (default %(default)s)"
    )
    parser.add_argument(
        "--ids", type=int, default=defaults.ids, help="identities in all, half train / half test (default %(default)s)"
    )
    parser.add_argument(
        "--cameras", type=int, default=defaults.cameras, help="number of cameras, 2-9 (default %(default)s)"
    )
    parser.add_argument("--width", type=int, default=defaults.width, help="image width (default %(default)s)")
    parser.add_argument("--height", type=int, default=defaults.height, help="image height (default %(default)s)")
    parser.add_argument(
        "--train-images",
        type=_int_range,
        default="{},{}".format(*defaults.train_images),
        metavar="LOW,HIGH",
        help="images per train identity (default %(default)s)",
    )
    parser.add_argument(
        "--gallery-per-camera",
        type=_int_range,
        default="{},{}".format(*defaults.gallery_per_camera),
        metavar="LOW,HIGH",
        help="gallery images per test identity and camera (default %(default)s)",
    )
    parser.add_argument(
        "--queries-per-id",
        type=int,
        default=defaults.queries_per_id,
        help="queries per test identity (default %(default)s)",
    )
    parser.add_argument(
        "--distractors",
        type=float,
        default=defaults.distractors,
        help="pid 0 gallery images, as a share of the identities' gallery images (default %(default)s)",
    )
    parser.add_argument(
        "--junk",
        type=float,
        default=defaults.junk,
        help="pid -1 (junk) gallery images, same unit (default %(default)s)",
    )
    parser.add_argument(
        "--query-occlusion",
        type=float,
        default=defaults.query_occlusion,
        help="share of occluded queries (default %(default)s)",
    )
    parser.add_argument(
        "--gallery-occlusion",
        type=float,
        default=defaults.gallery_occlusion,
        help="share of occluded gallery images (default %(default)s)",
    )
    parser.add_argument(
        "--train-occlusion",
        type=float,
        default=defaults.train_occlusion,
        help="share of occluded train images (default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing synthetic dataset in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = SynthConfig(
            seed=args.seed,
            ids=args.ids,
            cameras=args.cameras,
            width=args.width,
            height=args.height,
            train_images=args.train_images,
            gallery_per_camera=args.gallery_per_camera,
            queries_per_id=args.queries_per_id,
            distractors=args.distractors,
            junk=args.junk,
            query_occlusion=args.query_occlusion,
            gallery_occlusion=args.gallery_occlusion,
            train_occlusion=args.train_occlusion,
            id_cameras=(2, min(SynthConfig.id_cameras[1], args.cameras)),
        )
        start = time.perf_counter()
        out = generate_synthetic_dataset(args.out, config, progress=not args.quiet, force=args.force)
    except SynthOptionError as error:
        print(f"dpm-reid synth: error: --{error.option.replace('_', '-')}: {error.problem}", file=sys.stderr)
        return 2
    except DatasetError as error:  # an unusable --out
        print(f"dpm-reid synth: error: --out: {error}", file=sys.stderr)
        return 2
    manifest = read_synthetic_manifest(str(out))
    counts = manifest["counts"]
    occluded_queries = sum(name.startswith("query/") for name in manifest["occlusion"])
    print(
        f"wrote {out} in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{split} {ids} ids / {images} images" for split, (ids, images) in counts.items())
        + f"; {occluded_queries} of {counts['query'][1]} queries occluded"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
