"""What every picture shares: an Agg figure of an exact pixel size, its atomic PNG write, the input
checks (ValueError naming the argument) and thumbnails."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
THUMB = (64, 128)  # thumbnail (width, height) in pixels


def _new_figure(width_px: int, height_px: int) -> Figure:
    """A figure of exactly width_px x height_px pixels at DPI on an Agg canvas: no pyplot state,
    no GUI backend, nothing shown, and the caller's matplotlib backend is left alone."""
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _check_out_png(out_png) -> str:
    """``out_png`` as a path, if a .png file can be written there: checked before a picture is drawn (a folder
    of that name failed after the drawing, naming the temporary file). Its folder is created when the picture
    is saved (a call refused for its other arguments left new folders behind)."""
    if not isinstance(out_png, (str, os.PathLike)) or not os.fspath(out_png).lower().endswith(".png"):
        raise ValueError(f"out_png must name a .png file, got {out_png!r}")
    out_png = os.fspath(out_png)
    if os.path.isdir(out_png):
        raise ValueError(f"out_png {out_png} is a folder")
    existing = os.path.dirname(os.path.abspath(out_png))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "is a file" if not os.path.isdir(existing) else "is not writable"
        raise ValueError(f"out_png {out_png}: cannot create its folder ({existing} {why})")
    return out_png


def _save(fig: Figure, out_png) -> str:
    """The figure as a PNG at ``out_png``, written atomically (engine.checkpoint.atomic_write: a reader never
    sees a half-written picture); a failed write is an OSError naming ``out_png``, not the temporary file."""
    from dpm_ops.engine.checkpoint import atomic_write

    out_png = _check_out_png(out_png)
    try:
        # zlib level 4: 2-3x faster than Pillow's default 6 on photo mosaics, ~2 % larger
        atomic_write(
            out_png, lambda handle: fig.savefig(handle, dpi=DPI, format="png", pil_kwargs={"compress_level": 4})
        )
    except OSError as error:  # a full disk, a read-only file system
        raise OSError(error.errno, f"cannot write the picture ({error.strerror or error})", out_png) from None
    return out_png


def _array(name: str, value, ndim: int, dtype=None) -> np.ndarray:
    try:
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a {ndim}-D array, got {type(value).__name__}: {error}") from error
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array


def _floats(name: str, value) -> np.ndarray:
    """A 2-D floating-point array, float32 kept as it is (no float64 copy of a large matrix)."""
    array = _array(name, value, 2)
    if array.dtype.kind != "f":
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must hold numbers, got {array.dtype}") from error
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or inf")
    return array


def _labels(name: str, value, length: int) -> np.ndarray:
    array = _array(name, value, 1)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer labels, got {array.dtype}")
    if len(array) != length:
        raise ValueError(f"{name} must have length {length}, got {len(array)}")
    return array.astype(np.int64)


def _thumbnail(image, name: str, size=THUMB) -> Image.Image:
    """An image path, PIL image or (H, W, 3) / (H, W) uint8 array, resized to ``size`` (width, height); errors name
    the file or ``name`` (the argument and index it came from)."""
    from dpm_ops.data.image_io import as_rgb

    return as_rgb(image, name).resize(size, Image.BILINEAR)
