"""CMC / mAP / mINP under the Market-1501 protocol, without sorting the gallery.

Protocol (torchreid / fast-reid `eval_market1501`, spec rerank_eval.md §3): for each query,
gallery items with the same pid *and* the same camera are removed; the remaining items with
the same pid are its matches (distractors, pid 0, stay as negatives); a query with no match
left is skipped and counted.

Ranks: the gallery is ordered by (distance, gallery index), exactly what a stable argsort of
the row gives, and ranks count kept items only. A match's rank is therefore
1 + #{kept items (d, g) < (d_match, match)}, found for all matches of a query at once:

* sort the query's few matches by (distance, index);
* bucket every gallery item by the number of matches at most as close (`searchsorted`) and
  count the buckets: that gives, for each match, the items strictly closer;
* items at exactly a match's distance are found from their bucket and counted when their
  index is lower;
* removed items were counted like the others, so subtract those that precede each match.

Only the query's pid group is ever handled item by item; everything else is a few dense passes
over the (chunk, G) distances, with no per-row sort.
"""

from dataclasses import dataclass

import numpy as np
import torch

from . import _inputs
from ._ragged import expand_segments, segment_starts

AP_MODES = ("standard", "trapezoid")
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class RankResult:
    cmc: np.ndarray      # (max_rank,) share of valid queries matched within rank 1..max_rank
    mAP: float
    mINP: float
    all_AP: np.ndarray   # AP of every valid query, in query order
    num_valid: int       # queries with at least one match left
    num_skipped: int     # queries without one


class _IdentityGroups:
    """Gallery items grouped by pid, ascending gallery index within a group."""

    def __init__(self, g_pids: torch.Tensor):
        self.order = torch.argsort(g_pids, stable=True)
        self.pids, self.counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.starts = segment_starts(self.counts)

    def members(self, q_pids: torch.Tensor):
        """(query position, gallery index) of every gallery item sharing a query's pid."""
        group = torch.searchsorted(self.pids, q_pids).clamp_(max=len(self.pids) - 1)
        lengths = torch.where(self.pids[group] == q_pids, self.counts[group], 0)
        query, position = expand_segments(self.starts[group], lengths)
        return query, self.order[position]


def _preceding(values, indices, query, item, distance, ties_only: bool):
    """Per (query, match slot): how many of the given items precede that match in
    (distance, index) order; ties_only counts only items at exactly the match's distance."""
    match_values, match_indices = values[query], indices[query]
    before = (distance[:, None] == match_values) & (item[:, None] < match_indices)
    if not ties_only:
        before |= distance[:, None] < match_values
    return torch.zeros(values.shape, dtype=torch.long, device=values.device).index_add_(0, query, before.long())


def match_ranks(dist: torch.Tensor, query, item, removed):
    """Ranks of the matches of every query of a chunk.

    dist (B, G) distances; (query, item, removed): every gallery item sharing a query's pid,
    grouped by query with ascending item index, and whether the camera removes it.
    Returns (num_matches (B,), ranks (B, max matches)) with ranks ascending per query; slots
    past a query's number of matches are padding.
    """
    num_rows, num_gallery = dist.shape
    match_query, match_item = query[~removed], item[~removed]
    num_matches = torch.bincount(match_query, minlength=num_rows)
    width = int(num_matches.max())
    if width == 0:
        return num_matches, None
    slot = torch.arange(len(match_query), device=dist.device) - segment_starts(num_matches)[match_query]
    values = torch.full((num_rows, width), float("inf"), dtype=dist.dtype, device=dist.device)
    indices = torch.full((num_rows, width), num_gallery, dtype=torch.long, device=dist.device)
    values[match_query, slot] = dist[match_query, match_item]
    indices[match_query, slot] = match_item
    values, order = torch.sort(values, dim=1, stable=True)  # indices were ascending: (value, index) order
    indices = indices.gather(1, order)

    bins = width + 1
    flat = torch.searchsorted(values, dist, right=True)
    flat += torch.arange(num_rows, device=dist.device)[:, None] * bins
    closer = torch.bincount(flat.view(-1), minlength=num_rows * bins).view(num_rows, bins).cumsum(dim=1)[:, :width]

    # An item at exactly a match's distance lands in the bucket right after that match.
    previous_match = torch.cat([torch.full((num_rows, 1), -float("inf"), dtype=dist.dtype, device=dist.device),
                                values], dim=1).view(-1)
    tie_query, tie_item = torch.nonzero(previous_match[flat] == dist, as_tuple=True)
    tied_before = _preceding(values, indices, tie_query, tie_item, dist[tie_query, tie_item], ties_only=True)

    removed_query, removed_item = query[removed], item[removed]
    removed_before = _preceding(values, indices, removed_query, removed_item,
                                dist[removed_query, removed_item], ties_only=False)
    return num_matches, 1 + closer + tied_before - removed_before


def _labels(name: str, value, length: int, device) -> torch.Tensor:
    labels = _inputs.as_tensor(name, value, 1, device)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer labels, got {labels.dtype}")
    if len(labels) != length:
        raise ValueError(f"{name} must have length {length} to match distmat, got {len(labels)}")
    return labels.long()


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  ap: str = "standard") -> RankResult:
    """Market-1501 CMC, mAP and mINP of a (Q, G) distance matrix (numpy or torch, CPU or CUDA,
    float16/32/64). ap="standard": non-interpolated AP (torchreid, fast-reid);
    ap="trapezoid": the official Market MATLAB AP, mean of (i / r_i + (i-1) / (r_i - 1)) / 2.

    The CMC always has max_rank entries; past the number of gallery items it stays at 1.
    """
    max_rank = _inputs.check_count("max_rank", max_rank, 1)
    _inputs.check_choice("ap", ap, AP_MODES)
    dist = _inputs.as_tensor("distmat", distmat, 2)
    if not dist.is_floating_point():
        raise ValueError(f"distmat must hold floating-point distances, got {dist.dtype}")
    num_query, num_gallery = dist.shape
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"distmat is empty (shape {tuple(dist.shape)}): need at least one query and one gallery item")
    device = dist.device
    q_pids = _labels("q_pids", q_pids, num_query, device)
    q_camids = _labels("q_camids", q_camids, num_query, device)
    g_pids = _labels("g_pids", g_pids, num_gallery, device)
    g_camids = _labels("g_camids", g_camids, num_gallery, device)
    dtype = _inputs.compute_dtype(dist)
    groups = _IdentityGroups(g_pids)

    all_ap, first_ranks, inverse_penalty, num_skipped = [], [], [], 0
    step = max(1, _CHUNK_ELEMENTS // num_gallery)
    for start in range(0, num_query, step):
        stop = min(start + step, num_query)
        chunk = dist[start:stop].to(dtype).contiguous()
        _inputs.check_finite("distmat", chunk)
        query, item = groups.members(q_pids[start:stop])
        removed = g_camids[item] == q_camids[start + query]
        num_matches, ranks = match_ranks(chunk, query, item, removed)
        valid = num_matches > 0
        num_skipped += int((~valid).sum())
        if ranks is None:
            continue
        num_matches, ranks = num_matches[valid], ranks[valid]
        found = torch.arange(1, ranks.shape[1] + 1, device=device, dtype=torch.float64)
        in_use = found <= num_matches[:, None]
        rank_values = ranks.double()
        precision = found / rank_values
        if ap == "trapezoid":
            # Precision just before the match: (i - 1) / (r - 1), or 1 at rank 1.
            before = torch.where(ranks > 1, (found - 1) / (rank_values - 1).clamp_min(1), 1.0)
            precision = (precision + before) / 2
        all_ap.append((precision * in_use).sum(dim=1) / num_matches)
        first_ranks.append(ranks[:, 0])
        last_ranks = rank_values.gather(1, (num_matches - 1)[:, None])[:, 0]
        inverse_penalty.append(num_matches / last_ranks)

    num_valid = num_query - num_skipped
    if num_valid == 0:
        raise ValueError("no query has a match in the gallery (same pid on another camera); "
                         "check q_pids / g_pids / q_camids / g_camids")
    all_ap = torch.cat(all_ap).cpu().numpy()
    first_ranks = torch.cat(first_ranks).clamp_(max=max_rank + 1)
    first_rank_counts = torch.bincount(first_ranks, minlength=max_rank + 2)[1:max_rank + 1]
    cmc = (first_rank_counts.cumsum(0).double() / num_valid).cpu().numpy()
    return RankResult(cmc=cmc, mAP=float(all_ap.mean()), mINP=float(torch.cat(inverse_penalty).cpu().numpy().mean()),
                      all_AP=all_ap, num_valid=num_valid, num_skipped=num_skipped)
