"""Ranked lists: the nearest gallery images of the best or worst queries, framed by whether they match."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..evaluation._inputs import check_count
from ..ops._checks import check_int_list
from ._common import THUMB, _check_out_png, _floats, _labels, _new_figure, _save, _thumbnail

_FRAME = 4  # frame width around gallery thumbnails
_GAP = 4  # gap between thumbnails
_QUERY_GAP = 16  # extra gap between the query and its ranked list
_TOP_BAND, _BOTTOM_BAND = 16, 13
_MATCH, _WRONG, _QUERY = (46, 160, 67), (214, 39, 40), (60, 60, 60)


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
        # the CMC is not wanted: a max_rank within the gallery keeps evaluate_rank's cut warning away
        ap[valid] = evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank=min(50, num_gallery)).all_AP
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
    _check_out_png(out_png)
    if which not in ("best", "worst"):
        raise ValueError(f"which must be 'best' or 'worst', got {which!r}")
    num_queries, top_k = check_count("num_queries", num_queries, 1), check_count("top_k", top_k, 1)
    dist = _ranked_distances(distmat, query_paths, gallery_paths, q_occluded)
    ap = query_average_precision(dist, q_pids, g_pids, q_camids, g_camids)
    top_k = min(top_k, dist.shape[1])
    q_pids, q_camids = np.asarray(q_pids, dtype=np.int64), np.asarray(q_camids, dtype=np.int64)
    g_pids, g_camids = np.asarray(g_pids, dtype=np.int64), np.asarray(g_camids, dtype=np.int64)
    valid = np.flatnonzero(~np.isnan(ap))
    if len(valid) == 0:
        raise ValueError("no query has a true match in the gallery: nothing to rank")
    # stable sorts: among equal APs the lower query index comes first
    chosen = valid[np.argsort(-ap[valid] if which == "best" else ap[valid], kind="stable")][:num_queries]

    # a thumbnail larger than any person crop is only memory: (10^6, 10^6) drew a picture of terabytes
    tw, th = check_int_list(None, "thumb_size", thumb_size, 1, 1024, length=2, why=" (width, height)")
    cell_w, cell_h = tw + 2 * _FRAME + _GAP, th + 2 * _FRAME
    row_h = _TOP_BAND + cell_h + _BOTTOM_BAND
    width, height = (1 + top_k) * cell_w + _QUERY_GAP, len(chosen) * row_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    texts = []  # (x, y, text, colour)
    for row, q in enumerate(chosen):
        y0 = row * row_h + _TOP_BAND
        canvas.paste(Image.new("RGB", (tw + 2 * _FRAME, th + 2 * _FRAME), _QUERY), (0, y0))
        canvas.paste(_thumbnail(query_paths[q], f"query_paths[{q}]", (tw, th)), (_FRAME, y0 + _FRAME))
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
            canvas.paste(_thumbnail(gallery_paths[g], f"gallery_paths[{g}]", (tw, th)), (x0 + _FRAME, y0 + _FRAME))
            texts.append((x0, y0 + cell_h + 1, f"{k + 1}: {dist[q, g]:.3g}", "darkgreen" if match else "darkred"))

    return _save_with_texts(canvas, texts, out_png)


def _save_with_texts(canvas: Image.Image, texts: list, out_png) -> str:
    """The mosaic at its pixel size, with its (x, y, text, colour) labels drawn over it."""
    width, height = canvas.size
    fig = _new_figure(width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.asarray(canvas), interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    for x, y, text, colour in texts:
        ax.text(x, y, text, fontsize=7, color=colour, va="top", ha="left")
    return _save(fig, out_png)


def _ranked_distances(distmat, query_paths, gallery_paths, q_occluded) -> np.ndarray:
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
    return dist
