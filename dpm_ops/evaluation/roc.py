"""TPR at fixed FPRs: fast-reid's ROC report (``TEST.ROC.ENABLED``), exactly, without sorting the pairs.

fast-reid's evaluator scores every kept (query, gallery) pair (Market's rule: the query's own identity on
its own camera left out) by its distance, labels the matches 0 and the non-matches 1, and runs sklearn's
``roc_curve(labels, scores)``: at each distinct distance t, from the largest down, FPR is the share of
matches with distance >= t and TPR that of non-matches. The curve gets sklearn's ``drop_intermediate``:
a point is dropped when the steps to it and from it are the same (equal second differences of both
counts), the first and last points stay, and (0, 0) is put in front. For each target FPR the report is
the TPR of the first point whose FPR is nearest (``np.argmin(np.abs(fprs - fpr))``).

Only a point where the count of matches grows can be the first of its FPR, and each distinct match
distance u is one: its step is (matches at u, non-matches at u) and the next point's step is the next
smaller match distance's, unless non-matches lie strictly between the two (a step with no match: it
differs). So the whole report follows from per-distinct-match-distance counts: the non-matches equal
to each one and those strictly between each two, one bucket per non-match, found from a monotone bin of
its distance or, in the bins that hold match distances, by a binary search among the U match distances;
no sort of the (Q, G) pairs. The FPRs and TPRs are the same float64 quotients as sklearn's, so the
nearest point and its ties are theirs.
"""

import numpy as np
import torch

from ..ops._checks import check_finite, check_real
from . import _inputs
from .rank import _CHUNK_ELEMENTS, query_gallery_labels

ROC_FPRS = (1e-4, 1e-3, 1e-2)  # fast-reid's evaluator reports TPR@FPR=1e-04, 1e-03 and 1e-02


def tpr_at_fpr(distmat, q_pids, g_pids, q_camids, g_camids, fpr=ROC_FPRS) -> np.ndarray:
    """The TPR (float64, shape (len(fpr),)) at each FPR of ``fpr`` (a number or a sequence of numbers in
    [0, 1]) on the ROC curve of the (Q, G) distances, as fast-reid's evaluator reports it (module
    docstring): the matches are sklearn's negatives, so TPR@FPR=1e-4 is the share of non-matches at or
    beyond the distance that all but about 0.01 % of the matches lie within. numpy or torch inputs, CPU
    or CUDA, any float dtype. No match or no non-match among the kept pairs (sklearn's NaN rates) is a
    ValueError."""
    targets = [check_real(None, "fpr", value, 0.0, 1.0) for value in _as_list(fpr)]
    dist = _inputs.as_floats("tpr_at_fpr", "distmat", distmat, 2)
    labels = query_gallery_labels(dist, q_pids, q_camids, g_pids, g_camids)
    matches, equal, between = _pair_counts(dist, *labels)
    fps, tps = _curve(matches, equal, between)
    fprs, tprs = fps / fps[-1], tps / float(equal.sum() + between.sum())
    return np.array([tprs[np.argmin(np.abs(fprs - target))] for target in targets], dtype=np.float64)


def _as_list(fpr) -> list:
    if isinstance(fpr, (list, tuple)) and len(fpr) > 0:
        return list(fpr)
    if isinstance(fpr, (list, tuple)):
        raise ValueError("fpr must be a number or a non-empty sequence of numbers in [0, 1], got an empty one")
    return [fpr]


def _pair_counts(dist, q_pids, q_camids, g_pids, g_camids):
    """Over the kept pairs, per distinct match distance in increasing order: the matches at it and the
    non-matches equal to it ((U,) each), and the non-matches strictly between it and the previous one
    ((U + 1,): [0] below the smallest, [U] above the largest); int64 numpy arrays. Two passes over query
    chunks: the match distances, then one bucket 2i (+1 when equal) per non-match, i the number of
    distinct match distances below it: counted per bin of _MonotoneBins where no match distance shares the
    non-match's bin, found by a binary search where one does."""
    num_query, num_gallery = dist.shape
    step = max(1, _CHUNK_ELEMENTS // num_gallery)
    chunks = [slice(start, start + step) for start in range(0, num_query, step)]

    def pairs(rows):
        chunk = dist[rows]
        chunk = chunk.float() if chunk.element_size() < 4 else chunk  # exact; searchsorted's dtypes
        return chunk, g_pids[None] == q_pids[rows, None]

    match_distances = []
    for rows in chunks:
        chunk, same_id = pairs(rows)
        if not bool(torch.isfinite(chunk.sum())):  # one cheap pass; the exact check only on failure
            check_finite("tpr_at_fpr", distmat=chunk)
        match_distances.append(chunk[same_id & (g_camids[None] != q_camids[rows, None])])
    values, matches = torch.unique(torch.cat(match_distances), sorted=True, return_counts=True)
    if len(values) == 0:
        raise ValueError(
            "no query has a match in the gallery (same pid on another camera): the FPR is undefined; "
            "check q_pids / g_pids / q_camids / g_camids"
        )
    # bins: at most an eighth of the pairs (their O(bins) work per chunk is then small), 2^10 to 2^20
    bins = _MonotoneBins(values, 1 << min(20, max(10, (num_query * num_gallery // 8).bit_length())))
    buckets = torch.zeros(2 * len(values) + 1, dtype=torch.int64, device=dist.device)
    by_bin = torch.zeros(bins.count, dtype=torch.int64, device=dist.device)
    for rows in chunks:
        chunk, same_id = pairs(rows)
        others = chunk[~same_id]
        of = bins.of(others)
        by_bin += torch.bincount(of, minlength=bins.count)
        searched = others[bins.holds_match[of]]  # the rest are placed by their bin alone
        below = torch.searchsorted(values, searched)
        equal = values[below.clamp(max=len(values) - 1)] == searched
        buckets += torch.bincount(2 * below + equal, minlength=len(buckets))
    free = ~bins.holds_match
    buckets.index_add_(0, 2 * bins.values_below[free], by_bin[free])
    if int(buckets.sum()) == 0:
        raise ValueError("no query has a non-match in the gallery (another pid): the TPR is undefined")
    buckets = buckets.cpu().numpy()
    return matches.cpu().numpy(), buckets[1::2], buckets[0::2]


class _MonotoneBins:
    """A bin index per distance, non-decreasing in it: floor((d - lo) * scale) clamped to [-1, count - 2],
    plus 1, each step IEEE-rounded and so monotone, lo / hi the least / greatest match distance. A non-match
    in a bin that holds no match distance has as many match distances below it as lie in the lower bins (a
    match distance below it has a bin <= its own, hence lower; one above it, a higher one), and equals none."""

    def __init__(self, values: torch.Tensor, count: int):
        self.count = count
        low, span = float(values[0]), float(values[-1]) - float(values[0])  # in float64: no overflow
        self.low = low
        # the greatest match distance lands in bin count - 2 at most, so the last bin, where the distances far
        # above it go, holds none; capped to stay finite in float32 (no 0 * inf; an inf d - lo is clamped)
        self.scale = min((count - 3) / span, 1e30) if span > 0 else 1.0
        counts = torch.bincount(self.of(values), minlength=count)
        self.holds_match = counts > 0
        self.values_below = torch.cumsum(counts, 0) - counts

    def of(self, distances: torch.Tensor) -> torch.Tensor:
        scaled = (distances - self.low) * self.scale
        return scaled.clamp_(-1, self.count - 2).floor_().long() + 1


def _curve(matches, equal, between):
    """(false positives, true positives) of the points of the dropped curve that can be the first of
    their FPR, (0, 0) in front, as float64 counts in sklearn's order (decreasing distance). Point j, at
    the j-th largest match distance, steps by (matches, equal non-matches) there; the next point steps
    by the next match distance's unless non-matches lie between (its step has no match)."""
    matches, equal = matches[::-1], equal[::-1]
    above, below = between[::-1][:-1], between[::-1][1:]
    kept = below > 0
    kept[:-1] |= (matches[1:] != matches[:-1]) | (equal[1:] != equal[:-1])
    kept[-1] = True  # the last point of the curve, or followed by a step with no match
    kept[0] |= above[0] == 0  # the first point of the curve
    fps = np.concatenate([[0], np.cumsum(matches)[kept]]).astype(np.float64)
    tps = np.concatenate([[0], np.cumsum(above + equal)[kept]]).astype(np.float64)
    return fps, tps
