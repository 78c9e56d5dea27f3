"""Plain-PyTorch reference of the ROC counts kernel ``roc_counts`` (csrc/roc/), from which fast-reid's TPR@FPR
report follows (dpm_ops/evaluation/roc.py): over the kept (query, gallery) pairs (Market's rule: the query's
own identity on its own camera left out), the matches at each distinct match distance (same pid, another
camera) and, per non-match (another pid), one count in the bucket of its distance among the U distinct match
distances: 2i when i of them lie below it and none equals it, 2i + 1 when the i-th (0-based) equals it.
Bucket 2U + 1 is 1 when distmat holds a NaN or inf (the other counts are then unspecified). No sort and no
copy of the pairs: each non-match is placed by a monotone bin of its distance or, in the bins that hold
match distances, by a binary search.
"""

import torch

_CHUNK_ELEMENTS = 1 << 22


def roc_counts_reference(dist, q_pids, g_pids, q_camids, g_camids):
    """(matches (U,), buckets (2U + 2,)), int64 on dist's device (module docstring); two passes over query
    chunks: the match distances, then the non-matches' buckets."""
    num_query, num_gallery = dist.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, num_gallery))
    chunks = [slice(start, start + step) for start in range(0, max(1, num_query), step)]  # one when Q is 0

    def pairs(rows):
        chunk = dist[rows]
        chunk = chunk.float() if chunk.element_size() < 4 else chunk  # exact; searchsorted's dtypes
        return chunk, g_pids[None] == q_pids[rows, None]

    match_distances, finite = [], True
    for rows in chunks:
        chunk, same_id = pairs(rows)
        # a sum first: one reduction, no (rows, G) mask; the exact scan only where it is not finite
        finite = finite and (bool(torch.isfinite(chunk.sum())) or bool(torch.isfinite(chunk).all()))
        match_distances.append(chunk[same_id & (g_camids[None] != q_camids[rows, None])])
    values, matches = torch.unique(torch.cat(match_distances), sorted=True, return_counts=True)
    buckets = torch.zeros(2 * len(values) + 2, dtype=torch.int64, device=dist.device)
    if not finite:
        buckets[-1] = 1
        return matches, buckets
    # bins: at most an eighth of the pairs (their O(bins) work per chunk is then small), 2^10 to 2^20
    bins = _MonotoneBins(values, 1 << min(20, max(10, (num_query * num_gallery // 8).bit_length())))
    by_bin = torch.zeros(bins.count, dtype=torch.int64, device=dist.device)
    for rows in chunks:
        chunk, same_id = pairs(rows)
        others = chunk[~same_id]
        of = bins.of(others)
        by_bin += torch.bincount(of, minlength=bins.count)
        searched = others[bins.holds_match[of]]  # the rest are placed by their bin alone
        below = torch.searchsorted(values, searched)
        equal = values[below.clamp(max=max(0, len(values) - 1))] == searched
        buckets[:-1] += torch.bincount(2 * below + equal, minlength=len(buckets) - 1)
    free = ~bins.holds_match
    buckets.index_add_(0, 2 * bins.values_below[free], by_bin[free])
    return matches, buckets


class _MonotoneBins:
    """A bin index per distance, non-decreasing in it: floor((d - lo) * scale) clamped to [-1, count - 2],
    plus 1, each step IEEE-rounded and so monotone, lo / hi the least / greatest match distance. A non-match
    in a bin that holds no match distance has as many match distances below it as lie in the lower bins (a
    match distance below it has a bin <= its own, hence lower; one above it, a higher one), and equals none."""

    def __init__(self, values: torch.Tensor, count: int):
        self.count = count
        low = float(values[0]) if len(values) else 0.0
        span = float(values[-1]) - low if len(values) else 0.0  # in float64: no overflow
        self.low = low
        # capped to stay finite in float32 (no 0 * inf; an inf d - lo is clamped), floored above 0
        self.scale = max(min((count - 3) / span, 1e30), 1e-300) if span > 0 else 1.0
        counts = torch.bincount(self.of(values), minlength=count)
        self.holds_match = counts > 0
        self.values_below = torch.cumsum(counts, 0) - counts

    def of(self, distances: torch.Tensor) -> torch.Tensor:
        scaled = (distances - self.low) * self.scale
        return scaled.clamp_(-1, self.count - 2).floor_().long() + 1
