"""What surrounds the person: occluders drawn in front of them and the cameras' backgrounds."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from .drawing import Painter, Pose, draw_person, pattern_layer, random_appearance, random_grey, random_hsv

OCCLUDER_KINDS = ("ground", "side", "pole", "board", "person")


def _textured_block(size: tuple, rng: np.random.Generator) -> Image.Image:
    """The surface of a ground occluder: a crate, a car or a bush."""
    kind = rng.choice(["crate", "car", "bush"])
    if kind == "crate":
        base = (int(rng.integers(120, 190)), int(rng.integers(80, 130)), int(rng.integers(40, 80)))
        texture = pattern_layer(
            size, base, tuple(int(c * 0.75) for c in base), "hstripes", float(rng.uniform(8, 20)), (0, 0)
        )
    elif kind == "car":
        texture = Image.new("RGB", size, random_hsv(rng, value=(0.3, 0.9)))
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
    paint = Painter(layer)
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
            box = [0, 0, pose.centre_x - half_body + 2 * half_body * cover, height]
        else:
            box = [pose.centre_x + half_body - 2 * half_body * cover, 0, width, height]
        paint.rectangle(box, random_grey(rng, 60, 200))
    elif kind == "pole":  # one or two thick poles / tree trunks
        for _ in range(int(rng.integers(1, 3))):
            x = pose.centre_x + rng.uniform(-0.8, 0.8) * half_body
            half = rng.uniform(0.15, 0.35) * half_body
            paint.rectangle([x - half, 0, x + half, height], random_hsv(rng, saturation=(0.0, 0.4), value=(0.2, 0.6)))
    elif kind == "board":  # sign, umbrella or railing across the torso or the legs
        centre = pose.top + u * rng.uniform(0.25, 0.75)
        half = u * rng.uniform(0.1, 0.2)
        paint.rectangle([0, centre - half, width, centre + half], random_hsv(rng, value=(0.4, 0.95)))
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


def make_camera(rng: np.random.Generator, canvas_w: int, canvas_h: int) -> Camera:
    background = Image.new("RGB", (canvas_w * 2, canvas_h), random_hsv(rng, saturation=(0.05, 0.4), value=(0.35, 0.85)))
    draw = ImageDraw.Draw(background)
    horizon = int(canvas_h * rng.uniform(0.45, 0.7))
    wall_style = rng.choice(["bricks", "panels", "windows", "plain"])
    wall = random_hsv(rng, saturation=(0.05, 0.5), value=(0.3, 0.9))
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
            draw.rectangle([x, y, x + w, y + h], fill=random_hsv(rng, saturation=(0.0, 0.3), value=(0.15, 0.9)))
    ground = random_hsv(rng, saturation=(0.0, 0.35), value=(0.25, 0.7))
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
                fill=random_hsv(rng, hue=0.3 + rng.uniform(-0.05, 0.05), value=(0.2, 0.6)),
            )
    return Camera(
        background=background,
        gain=rng.uniform(0.8, 1.2, size=3),
        brightness=float(rng.uniform(0.75, 1.15)),
        person_scale=float(rng.uniform(0.8, 0.92)),
        blur=float(rng.uniform(0.0, 0.9)),
        noise=float(rng.uniform(2.0, 7.0)),
    )
