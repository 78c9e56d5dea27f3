"""Pictures of a training / evaluation run, written as PNG files with matplotlib's Agg backend
(no display needed, nothing is ever shown):

* :func:`plot_cmc`: CMC curves (one per query subset);
* :func:`plot_loss_curves`: every loss term of the trainer's ``train_log.jsonl`` against the
  step, the learning rate on a second axis;
* :func:`plot_ranked_lists`: the top-k gallery images of the best or worst queries, green
  frames for true matches, red for wrong ones (same-pid-same-camera junk removed, as in the
  Market-1501 protocol);
* :func:`plot_mask_heatmaps`: DPM's channel masks (and where in the image the kept channels are).

Every function checks its input and raises ValueError naming the bad argument.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
THUMB = (64, 128)  # thumbnail (width, height) in pixels
_FRAME = 4  # frame width around gallery thumbnails
_GAP = 4  # gap between thumbnails
_QUERY_GAP = 16  # extra gap between the query and its ranked list
_TOP_BAND, _BOTTOM_BAND = 16, 13
_MATCH, _WRONG, _QUERY = (46, 160, 67), (214, 39, 40), (60, 60, 60)


# ------------------------------------------------------------------------------------ helpers


def _new_figure(width_px: int, height_px: int) -> Figure:
    """A figure of exactly width_px x height_px pixels at DPI on an Agg canvas: no pyplot state,
    no GUI backend, nothing shown, and the caller's matplotlib backend is left alone."""
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png) -> str:
    out_png = os.fspath(out_png)
    if not out_png.lower().endswith(".png"):
        raise ValueError(f"out_png must name a .png file, got {out_png!r}")
    folder = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(out_png)}.{os.getpid()}.tmp.png")
    try:
        # zlib level 4: 2-3x faster than Pillow's default 6 on photo mosaics, ~2 % larger
        fig.savefig(tmp, dpi=DPI, format="png", pil_kwargs={"compress_level": 4})
        os.replace(tmp, out_png)  # a reader never sees a half-written picture
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _thumbnail(image, size=THUMB) -> Image.Image:
    """An image path, PIL image or (H, W, 3) uint8 array, resized to ``size`` (width, height)."""
    if isinstance(image, (str, os.PathLike)):
        from dpm_ops.data.image_io import read_image  # errors name the file

        image = read_image(os.fspath(image))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image).astype(np.uint8)).convert("RGB")
    elif not isinstance(image, Image.Image):
        raise ValueError(f"images must be paths, PIL images or uint8 arrays, got {type(image).__name__}")
    return image.convert("RGB").resize(size, Image.BILINEAR)


# ------------------------------------------------------------------------------------ CMC


def _cmc_percent(name: str, value) -> np.ndarray:
    """A CMC in percent from an evaluate_model subset dict, a RankResult or an array
    (fractions in [0, 1] as RankResult.cmc, or percent when any value exceeds 1)."""
    if isinstance(value, Mapping):
        if "cmc" not in value:
            raise ValueError(f"{name} has no 'cmc' curve")
        curve = _array(name, value["cmc"], 1, np.float64)  # evaluate_model's curves are in percent
    else:
        is_result = hasattr(value, "cmc")  # a RankResult: fractions
        curve = _array(name, value.cmc if is_result else value, 1, np.float64)
        percent = not is_result and curve.size > 0 and curve.max() > 1.0
        if not percent:
            curve = curve * 100.0
    if curve.size == 0:
        raise ValueError(f"{name} is an empty CMC curve")
    if curve.min() < 0 or curve.max() > 100.0 + 1e-6 or np.any(np.diff(curve) < -1e-9):
        raise ValueError(f"{name} is not a CMC curve (non-decreasing, within [0, 1] or [0, 100] %)")
    return curve


def plot_cmc(metrics_or_cmc, out_png, *, title: Optional[str] = None) -> str:
    """Plot CMC curves (matching rate in % against rank) to ``out_png`` (600 x 400 px).

    ``metrics_or_cmc``: the dict ``evaluate_model`` returns (one curve per query subset), a
    ``RankResult``, one curve (array, fractions as ``RankResult.cmc`` or percent), or a dict of
    name -> curve / RankResult.
    """
    if isinstance(metrics_or_cmc, Mapping):
        curves = {
            name: _cmc_percent(f"metrics_or_cmc[{name!r}]", value)
            for name, value in metrics_or_cmc.items()
            if not (isinstance(value, Mapping) and "cmc" not in value)
        }  # skip e.g. "settings"
        if not curves:
            raise ValueError("metrics_or_cmc holds no CMC curve")
    else:
        curves = {"CMC": _cmc_percent("metrics_or_cmc", metrics_or_cmc)}
    fig = _new_figure(600, 400)
    ax = fig.add_axes((0.11, 0.13, 0.85, 0.78))
    for name, curve in curves.items():
        ranks = np.arange(1, len(curve) + 1)
        ax.plot(
            ranks, curve, marker="o" if len(curve) <= 20 else None, markersize=3, label=f"{name} (R1 {curve[0]:.1f}%)"
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, max(len(c) for c in curves.values()))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "CMC")
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------ losses


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped); ValueError naming file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"jsonl_path: no such file: {path}")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_loss_curves(jsonl_path, out_png, *, title: Optional[str] = None) -> str:
    """Plot every loss field (``loss`` and ``loss/<component>``) of the trainer's
    ``train_log.jsonl`` against ``step``, and ``lr`` on a second y axis, to ``out_png``
    (800 x 450 px). Lines without ``step`` (e.g. evaluation records) are ignored; a field
    missing from some lines is drawn through the lines that have it."""
    records = [r for r in read_jsonl(jsonl_path) if "step" in r]
    series: dict[str, tuple[list, list]] = {}
    lr_steps, lrs = [], []
    for record in records:
        step = record["step"]
        if not _is_number(step):
            raise ValueError(f"{jsonl_path}: step must be a number, got {step!r}")
        for key, value in record.items():
            if (key == "loss" or key.startswith("loss/")) and _is_number(value):
                series.setdefault(key, ([], []))
                series[key][0].append(step)
                series[key][1].append(value)
        if _is_number(record.get("lr")):
            lr_steps.append(step)
            lrs.append(record["lr"])
    if not series:
        raise ValueError(f"{jsonl_path}: no line has a numeric 'step' and a 'loss' or 'loss/<name>' field")
    fig = _new_figure(800, 450)
    ax = fig.add_axes((0.08, 0.12, 0.78, 0.78))
    for key in sorted(series, key=lambda k: (k != "loss", k)):  # total first, thicker
        steps, values = series[key]
        ax.plot(steps, values, label=key, linewidth=2.0 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        twin = ax.twinx()
        (line,) = twin.plot(lr_steps, lrs, color="black", linestyle="--", linewidth=1.0, label="lr")
        twin.set_ylabel("learning rate")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        handles.append(line)
        labels.append("lr")
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(title or f"training losses ({os.path.basename(os.fspath(jsonl_path))})")
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------ ranked lists


def _kept_order(row: np.ndarray, q_pid: int, q_camid: int, g_pids: np.ndarray, g_camids: np.ndarray) -> np.ndarray:
    """Gallery indices by (distance, index) with the protocol's junk (same pid and camera) removed."""
    order = np.argsort(row, kind="stable")
    junk = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
    return order[~junk]


def query_average_precision(distmat, q_pids, g_pids, q_camids, g_camids) -> np.ndarray:
    """AP of every query under the Market-1501 protocol (NaN for a query without a match)."""
    from dpm_ops.evaluation import evaluate_rank

    dist = _floats("distmat", distmat)
    num_query, num_gallery = dist.shape
    q_pids, q_camids = _labels("q_pids", q_pids, num_query), _labels("q_camids", q_camids, num_query)
    g_pids, g_camids = _labels("g_pids", g_pids, num_gallery), _labels("g_camids", g_camids, num_gallery)
    valid = np.array([np.any((g_pids == p) & (g_camids != c)) for p, c in zip(q_pids, q_camids)], dtype=bool)
    ap = np.full(num_query, np.nan)
    if valid.any():
        ap[valid] = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids).all_AP
    return ap


def plot_ranked_lists(
    query_paths: Sequence,
    gallery_paths: Sequence,
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    out_png,
    *,
    which: str = "best",
    num_queries: int = 8,
    top_k: int = 10,
    q_occluded: Optional[Sequence[bool]] = None,
    thumb_size: tuple[int, int] = THUMB,
) -> str:
    """The ``top_k`` nearest gallery images of the ``num_queries`` queries with the highest
    (``which="best"``) or lowest (``"worst"``) average precision, one row per query.

    The query is on the left (dark frame; its pid, camera, AP and, with ``q_occluded``, whether
    it is occluded above it); then its ranked list with green frames for true matches and red
    for wrong ones, the distance under each. Gallery items with the query's pid and camera are
    skipped, as the evaluation protocol removes them. Queries without a true match cannot be
    ranked by AP and are never shown. Image size: ``(1 + top_k) * (w + 2*4 + 4) + 16`` by
    ``rows * (h + 2*4 + 29)`` pixels for thumbnails of ``thumb_size = (w, h)``.
    """
    if which not in ("best", "worst"):
        raise ValueError(f"which must be 'best' or 'worst', got {which!r}")
    num_queries, top_k = _positive_int("num_queries", num_queries), _positive_int("top_k", top_k)
    dist = _floats("distmat", distmat)
    if dist.shape != (len(query_paths), len(gallery_paths)):
        raise ValueError(
            f"distmat must be (len(query_paths), len(gallery_paths)) = "
            f"({len(query_paths)}, {len(gallery_paths)}), got {dist.shape}"
        )
    if dist.size == 0:
        raise ValueError("distmat is empty")
    if q_occluded is not None and len(q_occluded) != len(query_paths):
        raise ValueError(f"q_occluded must have length {len(query_paths)}, got {len(q_occluded)}")
    ap = query_average_precision(dist, q_pids, g_pids, q_camids, g_camids)
    top_k = min(top_k, dist.shape[1])
    q_pids, q_camids = np.asarray(q_pids, dtype=np.int64), np.asarray(q_camids, dtype=np.int64)
    g_pids, g_camids = np.asarray(g_pids, dtype=np.int64), np.asarray(g_camids, dtype=np.int64)
    valid = np.flatnonzero(~np.isnan(ap))
    if len(valid) == 0:
        raise ValueError("no query has a true match in the gallery: nothing to rank")
    # stable sorts: among equal APs the lower query index comes first
    chosen = valid[np.argsort(-ap[valid] if which == "best" else ap[valid], kind="stable")][:num_queries]

    tw, th = (_positive_int("thumb_size[0]", thumb_size[0]), _positive_int("thumb_size[1]", thumb_size[1]))
    cell_w, cell_h = tw + 2 * _FRAME + _GAP, th + 2 * _FRAME
    row_h = _TOP_BAND + cell_h + _BOTTOM_BAND
    width, height = (1 + top_k) * cell_w + _QUERY_GAP, len(chosen) * row_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    texts = []  # (x, y, text, colour)
    for row, q in enumerate(chosen):
        y0 = row * row_h + _TOP_BAND
        canvas.paste(Image.new("RGB", (tw + 2 * _FRAME, th + 2 * _FRAME), _QUERY), (0, y0))
        canvas.paste(_thumbnail(query_paths[q], (tw, th)), (_FRAME, y0 + _FRAME))
        tag = ""
        if q_occluded is not None:
            tag = ", occluded" if bool(q_occluded[q]) else ", clean"
        texts.append(
            (0, row * row_h + 2, f"query {q}: pid {q_pids[q]}, cam {q_camids[q]}, AP {100 * ap[q]:.1f}%{tag}", "black")
        )
        ranked = _kept_order(dist[q], q_pids[q], q_camids[q], g_pids, g_camids)[:top_k]
        for k, g in enumerate(ranked):
            x0 = (1 + k) * cell_w + _QUERY_GAP
            match = g_pids[g] == q_pids[q]
            canvas.paste(Image.new("RGB", (tw + 2 * _FRAME, th + 2 * _FRAME), _MATCH if match else _WRONG), (x0, y0))
            canvas.paste(_thumbnail(gallery_paths[g], (tw, th)), (x0 + _FRAME, y0 + _FRAME))
            texts.append((x0, y0 + cell_h + 1, f"{k + 1}: {dist[q, g]:.3g}", "darkgreen" if match else "darkred"))

    fig = _new_figure(width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.asarray(canvas), interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    for x, y, text, colour in texts:
        ax.text(x, y, text, fontsize=7, color=colour, va="top", ha="left")
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------ DPM masks


def _channel_grid(values: np.ndarray, columns: int) -> np.ndarray:
    """A 1-D channel vector laid out row-major in a grid (NaN padding, drawn blank)."""
    rows = math.ceil(len(values) / columns)
    grid = np.full(rows * columns, np.nan)
    grid[: len(values)] = values
    return grid.reshape(rows, columns)


def plot_mask_heatmaps(
    images: Sequence,
    masks,
    out_png,
    *,
    token_maps=None,
    all_masks=None,
    occluded: Optional[Sequence[bool]] = None,
    all_occluded: Optional[Sequence[bool]] = None,
    titles: Optional[Sequence[str]] = None,
) -> str:
    """DPM's Hierarchical-Mask-Generator output for a few queries (dpm.md §2).

    DPM's mask ``m ∈ (0,1)^C`` is a *channel* mask: it selects the subspace of the C-d CLS
    feature in which the query is compared with the gallery (``<q̂, n(m ⊙ ĝ)>``); there is no
    spatial or token-level mask in the model. The picture therefore shows, per query (columns):

    1. the query image;
    2. with ``token_maps`` (``(B, H_p, W_p)``, e.g. from ``dpm_ops.engine.pictures.dpm_token_maps``):
       the image overlaid with each patch token's energy share in the kept channels relative to
       a flat mask (1 = neutral; warm = the patch's features live in channels the mask keeps,
       cold = in channels it suppresses), an inspection aid that projects the channel mask back
       onto the image, not something DPM computes;
    3. the mask itself, C values laid out in a grid with the channels ordered by their mean mask
       over ``all_masks`` (the whole query set; default ``masks``), highest first, so the same
       cell is the same channel in every column (colour scale 0..1);
    4. the query's deviation from that mean mask (diverging scale, symmetric), which shows what
       the mask generator changes for this particular image;

    and below, the population profile: the mean mask of every channel (same order) over clean
    and occluded queries (``all_occluded`` labels ``all_masks``), which shows whether occluded
    queries switch more channels off. Image: ``max(700, 110·B)`` x 960 pixels (B = len(images)).
    """
    masks, population, token_maps = _check_mask_inputs(
        images, masks, token_maps, all_masks, occluded, all_occluded, titles
    )
    count, channels = masks.shape
    mean_mask = population.mean(axis=0)
    order = np.argsort(-mean_mask, kind="stable")
    fig = _new_figure(max(700, 110 * count), 960)
    rows = ["query"] + (["kept-channel\npatch energy"] if token_maps is not None else []) + ["mask m", "m − mean m"]
    grid = fig.add_gridspec(
        len(rows) + 1,
        count,
        height_ratios=[1.0] * len(rows) + [0.9],
        hspace=0.35,
        wspace=0.15,
        left=0.07,
        right=0.88,
        top=0.90,
        bottom=0.06,
    )
    images_drawn = _draw_query_columns(fig, grid, rows, images, masks, mean_mask, order, token_maps, occluded, titles)
    for r, key in enumerate(["energy"] * (token_maps is not None) + ["mask", "deviation"], start=1):
        box = grid[r, count - 1].get_position(fig)
        colorbar_ax = fig.add_axes((0.90, box.y0 + 0.1 * box.height, 0.012, 0.8 * box.height))
        fig.colorbar(images_drawn[key], cax=colorbar_ax).ax.tick_params(labelsize=6)
    fig.suptitle(
        f"DPM channel masks: {channels} channels in a grid, ordered by the mean mask over "
        f"{len(population)} queries (highest first)",
        fontsize=9,
        y=0.985,
    )
    _draw_population_profile(fig.add_subplot(grid[len(rows), :]), population, order, all_occluded)
    return _save(fig, out_png)


def _check_mask_inputs(images, masks, token_maps, all_masks, occluded, all_occluded, titles):
    """plot_mask_heatmaps' arguments checked: (masks, population, token_maps) as float64 arrays."""
    masks = _array("masks", masks, 2, np.float64)
    count, channels = masks.shape
    if count == 0 or channels == 0:
        raise ValueError(f"masks is empty (shape {masks.shape})")
    if len(images) != count:
        raise ValueError(f"images must have one entry per mask row ({count}), got {len(images)}")
    if masks.min() < 0 or masks.max() > 1:
        raise ValueError("masks must lie in [0, 1] (the HMG's sigmoid output)")
    population = masks if all_masks is None else _array("all_masks", all_masks, 2, np.float64)
    if population.shape[1] != channels or len(population) == 0:
        raise ValueError(f"all_masks must be (N, {channels}), got {population.shape}")
    if token_maps is not None:
        token_maps = _array("token_maps", token_maps, 3, np.float64)
        if len(token_maps) != count:
            raise ValueError(f"token_maps must have one map per mask row ({count}), got {len(token_maps)}")
    for name, flags, length in (("occluded", occluded, count), ("all_occluded", all_occluded, len(population))):
        if flags is not None and len(flags) != length:
            raise ValueError(f"{name} must have length {length}, got {len(flags)}")
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles must have length {count}, got {len(titles)}")
    return masks, population, token_maps


def _draw_query_columns(
    fig: Figure,
    grid,
    rows: list[str],
    images: Sequence,
    masks: np.ndarray,
    mean_mask: np.ndarray,
    order: np.ndarray,
    token_maps,
    occluded,
    titles,
) -> dict:
    """One column per query (image, patch energy, mask, deviation from the mean mask); returns the
    last image drawn of each kind, for the colour bars."""
    count, channels = masks.shape
    columns = max(1, math.ceil(math.sqrt(channels / 2)))  # a 2:1 grid, like a pedestrian crop
    deviation = masks - mean_mask
    spread = max(float(np.abs(deviation).max()), 1e-3)
    if token_maps is not None:
        norm = TwoSlopeNorm(
            vmin=min(float(token_maps.min()), 1 - 1e-3), vcenter=1.0, vmax=max(float(token_maps.max()), 1 + 1e-3)
        )
    images_drawn = {}
    for i in range(count):
        thumb = np.asarray(_thumbnail(images[i]))
        axes = [fig.add_subplot(grid[r, i]) for r in range(len(rows))]
        axes[0].imshow(thumb)
        label = titles[i] if titles is not None else f"q{i}"
        if occluded is not None:
            label += "\noccluded" if bool(occluded[i]) else "\nclean"
        axes[0].set_title(f"{label}\nmean m {masks[i].mean():.2f}", fontsize=7)
        if token_maps is not None:
            h, w = thumb.shape[:2]
            axes[1].imshow(thumb)
            images_drawn["energy"] = axes[1].imshow(
                token_maps[i],
                cmap="coolwarm",
                norm=norm,
                alpha=0.55,
                extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                interpolation="bilinear",
            )
        images_drawn["mask"] = axes[-2].imshow(
            _channel_grid(masks[i][order], columns), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        images_drawn["deviation"] = axes[-1].imshow(
            _channel_grid(deviation[i][order], columns), cmap="PuOr", vmin=-spread, vmax=spread, interpolation="nearest"
        )
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        if i == 0:
            for ax, name in zip(axes, rows):
                ax.set_ylabel(name, fontsize=7)
    return images_drawn


def _draw_population_profile(ax, population: np.ndarray, order: np.ndarray, all_occluded) -> None:
    """The mean mask of every channel (in ``order``) with its 10-90 % band, over all queries or
    over the clean and the occluded ones."""
    channels = population.shape[1]
    positions = np.arange(channels)
    groups = [("all queries", np.ones(len(population), dtype=bool))]
    if all_occluded is not None:
        flags = np.asarray(all_occluded, dtype=bool)
        groups = [("clean queries", ~flags), ("occluded queries", flags)]
    for name, selected in groups:
        if selected.any():
            profile = population[selected][:, order]
            mean = profile.mean(axis=0)
            ax.plot(positions, mean, linewidth=1.2, label=f"{name} (n={int(selected.sum())}, mean {mean.mean():.3f})")
            low, high = np.percentile(profile, [10, 90], axis=0)
            ax.fill_between(positions, low, high, alpha=0.15)
    ax.set_xlim(0, max(channels - 1, 1))
    ax.set_xlabel("channel (ordered by mean mask)", fontsize=8)
    ax.set_ylabel("mask", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
