"""DPM's channel masks: per query, and where in the image the kept channels are."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ._common import _array, _check_out_png, _new_figure, _save, _thumbnail


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
    """DPM's Hierarchical-Mask-Generator output for a few queries.

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
    _check_out_png(out_png)
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
    try:
        len(images)
    except TypeError:
        raise ValueError(f"images must be a list of image paths, PIL images or arrays, got {type(images).__name__}")
    if len(images) != count:
        raise ValueError(f"images must have one entry per mask row ({count}), got {len(images)}")
    if masks.min() < 0 or masks.max() > 1:
        raise ValueError("masks must lie in [0, 1] (the HMG's sigmoid output)")
    population = masks if all_masks is None else _array("all_masks", all_masks, 2, np.float64)
    if population.shape[1] != channels or len(population) == 0:
        raise ValueError(f"all_masks must be (N, {channels}), got {population.shape}")
    if population.min() < 0 or population.max() > 1:
        raise ValueError("all_masks must lie in [0, 1] (the HMG's sigmoid output)")
    if token_maps is not None:
        token_maps = _array("token_maps", token_maps, 3, np.float64)
        if len(token_maps) != count or 0 in token_maps.shape:
            raise ValueError(f"token_maps must be one non-empty map per mask row ({count}), got {token_maps.shape}")
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
        thumb = np.asarray(_thumbnail(images[i], f"images[{i}]"))
        axes = [fig.add_subplot(grid[r, i]) for r in range(len(rows))]
        axes[0].imshow(thumb)
        label = str(titles[i]) if titles is not None else f"q{i}"
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
