"""A person drawn from polygons: the identity (:class:`Appearance`), the per-image pose
(:class:`Pose`) and :func:`draw_person`, which paints them onto an RGBA layer."""

from __future__ import annotations

import colorsys
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw


def random_hsv(rng: np.random.Generator, saturation=(0.3, 0.95), value=(0.25, 0.95), hue=None) -> tuple[int, int, int]:
    h = rng.uniform(0.0, 1.0) if hue is None else hue % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value))
    return int(r * 255), int(g * 255), int(b * 255)


def random_grey(rng: np.random.Generator, low=30, high=220) -> tuple[int, int, int]:
    level = int(rng.integers(low, high))
    return level, level, level


def _garment_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    # real clothing has many dark/grey/white garments; keep them, they make matching harder
    return random_grey(rng) if rng.random() < 0.25 else random_hsv(rng)


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
        hat=random_hsv(rng),
        top=top,
        top_second=_garment_colour(rng),
        top_pattern=str(
            rng.choice(
                ["solid", "hstripes", "vstripes", "checks", "dots", "twotone"], p=[0.3, 0.2, 0.1, 0.15, 0.1, 0.15]
            )
        ),
        pattern_period=float(rng.uniform(0.03, 0.07)),
        long_sleeves=bool(rng.random() < 0.5),
        logo=random_hsv(rng) if rng.random() < 0.35 else None,
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


def pattern_layer(size: tuple, base: tuple, second: tuple, pattern: str, period: float, origin: tuple) -> Image.Image:
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


class Painter:
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


@dataclasses.dataclass(frozen=True)
class _Body:
    """Where the body's parts are on the canvas: heights and half-widths in pixels."""

    u: float  # body height, the unit of every proportion
    cx: float
    top: float
    wide: float  # build x view squash
    shoulder_y: float
    waist_y: float
    knee_y: float
    ankle_y: float
    shoulder_half: float
    waist_half: float
    hip_half: float
    leg_width: float

    @classmethod
    def of(cls, look: Appearance, pose: Pose) -> "_Body":
        u, top = pose.height, pose.top
        wide = look.build * pose.squash
        return cls(
            u=u,
            cx=pose.centre_x,
            top=top,
            wide=wide,
            shoulder_y=top + 0.16 * u,
            waist_y=top + 0.50 * u,
            knee_y=top + 0.72 * u,
            ankle_y=top + 0.95 * u,
            shoulder_half=0.125 * u * wide,
            waist_half=0.10 * u * wide,
            hip_half=0.105 * u * wide,
            leg_width=0.085 * u * wide,
        )


def draw_person(layer: Image.Image, look: Appearance, pose: Pose) -> None:
    """Draw a pedestrian (head, hair, torso, arms, legs, shoes, bag) onto an RGBA layer.

    Back to front: legs and bottom garment, torso, arms, bags, head.
    """
    paint = Painter(layer)
    body = _Body.of(look, pose)
    _draw_legs(paint, look, pose, body)
    top_texture = pattern_layer(
        layer.size,
        look.top,
        look.top_second,
        look.top_pattern,
        look.pattern_period * body.u,
        (body.cx, body.shoulder_y + 0.17 * body.u if look.top_pattern == "twotone" else body.shoulder_y),
    )
    _draw_torso(paint, body, top_texture)
    _draw_arms(paint, look, pose, body, top_texture)
    _draw_bag(paint, look, pose, body)
    _draw_head(paint, look, pose, body)


def _draw_legs(paint: Painter, look: Appearance, pose: Pose, body: _Body) -> None:
    """Skin legs, the bottom garment (trousers, shorts or skirt) over them, and the shoes."""
    u, cx, waist_y, knee_y, ankle_y = body.u, body.cx, body.waist_y, body.knee_y, body.ankle_y
    hip_half, waist_half, leg_width = body.hip_half, body.waist_half, body.leg_width
    legs = []
    for sign in (-1, 1):
        hip = (cx + sign * (hip_half - leg_width / 2), waist_y)
        ankle = (cx + sign * (hip_half - leg_width / 2 + pose.stance * u), ankle_y)
        legs.append(_limb(hip, ankle, leg_width, leg_width * 0.75))
    for points in legs:
        paint.polygon(points, look.skin)
    bottom_texture = pattern_layer(
        paint.layer.size,
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
        flare = 0.16 * u * body.wide
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
            [foot_x - 0.045 * u * body.wide, ankle_y - 0.015 * u, foot_x + 0.045 * u * body.wide, ankle_y + 0.035 * u],
            look.shoes,
        )


def _draw_torso(paint: Painter, body: _Body, top_texture: Image.Image) -> None:
    u, cx, shoulder_y, shoulder_half, waist_half = body.u, body.cx, body.shoulder_y, body.shoulder_half, body.waist_half
    torso = [
        (cx - shoulder_half * 0.8, shoulder_y - 0.01 * u),
        (cx + shoulder_half * 0.8, shoulder_y - 0.01 * u),
        (cx + shoulder_half, shoulder_y + 0.04 * u),
        (cx + waist_half, body.waist_y + 0.02 * u),
        (cx - waist_half, body.waist_y + 0.02 * u),
        (cx - shoulder_half, shoulder_y + 0.04 * u),
    ]
    paint.textured([torso], top_texture)


def _draw_arms(paint: Painter, look: Appearance, pose: Pose, body: _Body, top_texture: Image.Image) -> None:
    """Arms in skin with a sleeve in the top's texture, hands, and a handbag in one hand."""
    u, cx, shoulder_y = body.u, body.cx, body.shoulder_y
    arm_width = 0.06 * u * body.wide
    for sign in (-1, 1):
        shoulder = (cx + sign * (body.shoulder_half - arm_width / 3), shoulder_y + 0.03 * u)
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
        if look.bag == "handbag" and sign == look.bag_side:
            paint.line([hand, (hand[0], hand[1] + 0.04 * u)], look.bag_colour, 0.01 * u)
            paint.rectangle(
                [hand[0] - 0.05 * u, hand[1] + 0.04 * u, hand[0] + 0.05 * u, hand[1] + 0.12 * u], look.bag_colour
            )


def _draw_bag(paint: Painter, look: Appearance, pose: Pose, body: _Body) -> None:
    """A backpack or shoulder bag over the torso, then the chest logo (front view only)."""
    u, cx, shoulder_y, waist_y, shoulder_half = body.u, body.cx, body.shoulder_y, body.waist_y, body.shoulder_half
    side = look.bag_side
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
        bag_x = cx + side * (body.waist_half + 0.03 * u)
        paint.line([strap_top, (bag_x, waist_y - 0.02 * u)], look.bag_colour, 0.018 * u)
        paint.rectangle([bag_x - 0.05 * u, waist_y - 0.03 * u, bag_x + 0.05 * u, waist_y + 0.08 * u], look.bag_colour)
    if look.logo is not None and not pose.back_view:
        paint.ellipse([cx - 0.035 * u, shoulder_y + 0.07 * u, cx + 0.035 * u, shoulder_y + 0.14 * u], look.logo)


def _draw_head(paint: Painter, look: Appearance, pose: Pose, body: _Body) -> None:
    """Neck, long hair behind, the head (hair from the back), then hair or headwear on top."""
    u, cx, shoulder_y = body.u, body.cx, body.shoulder_y
    head_rx, head_ry, head_cy = 0.05 * u * (0.9 + 0.1 * body.wide), 0.068 * u, body.top + 0.075 * u
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
        return
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
