"""CMC / mAP / mINP under the Market-1501 protocol, without sorting the gallery.

Protocol (torchreid / fast-reid `eval_market1501`): for each query,
gallery items with the same pid *and* the same camera are removed; the remaining items with
the same pid are its matches (distractors, pid 0, stay as negatives); a query with no match
left is skipped and counted.

Ranks: the gallery is ordered by (distance, gallery index), exactly what a stable argsort of
the row gives, on every machine. torchreid and fast-reid sort with numpy's default argsort,
which is not stable: its order among exactly equal distances depends on the machine and the
numpy build (numpy 2.4's SIMD sort on an AVX-512 CPU turns [1, 1, 0, 0] into [3, 2, 1, 0]),
so exact ties are the one place where their numbers and ours may differ. Ranks count kept
items only, so a match's rank is 1 + #{kept items g : (d_g, g) < (d_match, match)}. Only items
no farther than the query's farthest match can precede a match, so each query's candidates are
the items with d <= (largest match distance), about 2 % of the gallery on Market-1501. Those
few are ordered by (query, distance, index) and a running count of kept items gives every
match's rank; the gallery row is touched only by one comparison and one compaction pass.
Queries' matches are found through pid groups of the gallery, never by comparing every pid.

CUHK03 single-gallery-shot (protocol="cuhk03", torchreid / fast-reid `use_metric_cuhk03`):
per query, after the same removal, one gallery item is drawn per identity among its kept items
(distractor pid 0 counts as one identity, as in theirs), the CMC is that of the query's match
among the drawn items, and it is averaged over `num_repeats` draws (10, as theirs); AP and
mINP stay those of the full kept gallery (their `eval_cuhk03` computes AP the same way and
reports no mINP). Their draws come from numpy's
global, unseeded RNG; ours from a `torch.Generator` seeded with `seed` (default 0), so a run is
reproducible and the same on every device: repetition r draws one float64 u per (query,
identity), identities in ascending pid order, and takes the floor(u * n)-th of the identity's n
kept items in gallery-index order.

Where the C++/CUDA extension is available the ranks come from one kernel (csrc/rank/,
`match_ranks`): per query, its matches from the pid groups, then a single pass over the row in
which every kept item no farther than the farthest match adds one to the ranks of the matches it
precedes. The torch path (dpm_ops/ops/rank_reference.py) computes the same ranks and is the fallback.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import _backend
from .._precision import compute_dtype
from ..ops._checks import check_finite
from ..ops._ragged import segment_starts
from ..ops.rank import MATCH_RANKS
from ..ops.rank_reference import IdentityGroups as _IdentityGroups
from ..ops.rank_reference import match_ranks
from . import _inputs

AP_MODES = ("standard", "trapezoid")
PROTOCOLS = ("market1501", "cuhk03")
MAX_REPEATS = 10_000  # cuhk03's draws run one after another: a bound on the run time (the protocol's is 10)
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class RankResult:
    cmc: np.ndarray  # (min(max_rank, G),) share of valid queries matched within rank 1..max_rank
    mAP: float
    mINP: float
    all_AP: np.ndarray  # AP of every valid query, in query order
    all_INP: np.ndarray  # inverse negative penalty of every valid query, in query order (fast-reid's all_INP)
    num_valid: int  # queries with at least one match left
    num_skipped: int  # queries without one


def kernel_match_ranks(dist: torch.Tensor, q_pids, q_camids, g_pids, g_camids, backend: str):
    """match_ranks through `backend`'s C++ or CUDA kernel (csrc/rank/): one pass over each gallery row
    ranks all of a query's matches (a kept item adds one to the ranks of the matches after it)."""
    offsets, rank = MATCH_RANKS.run(backend, dist, q_pids, g_pids, q_camids, g_camids)
    num_matches = offsets.diff()
    query = torch.repeat_interleave(torch.arange(len(dist), device=dist.device), num_matches)
    ordinal = torch.arange(len(rank), device=dist.device) - offsets[query] + 1
    return query, rank, ordinal, num_matches


def single_shot_match_ranks(dist: torch.Tensor, q_pids, q_camids, g_pids, g_camids, num_repeats: int, seed: int):
    """CUHK03 single-gallery-shot: (num_repeats, V) rank of each valid query's match (V queries
    keep one) among one drawn gallery item per identity.

    Only the query's own identity loses items (those on its camera), so each draw is one
    uniform number per (query, identity): the drawn item of every other identity is a gather,
    and the match's rank is 1 + the number of other identities whose drawn item precedes it in
    (distance, index) order.
    """
    num_query, device = len(dist), dist.device
    groups = _IdentityGroups(g_pids)
    num_groups = len(groups.pids)
    own = groups.group_of(q_pids)
    member_query, member_item = groups.members(q_pids)
    kept = g_camids[member_item] != q_camids[member_query]
    member_item = member_item[kept]
    num_kept = torch.bincount(member_query[kept], minlength=num_query)
    valid = num_kept > 0
    first_kept = segment_starts(num_kept)
    sizes = groups.counts.expand(num_query, num_groups).clone()
    sizes[torch.arange(num_query, device=device), own] = num_kept
    queries = torch.arange(num_query, device=device)[valid]
    generator = torch.Generator().manual_seed(seed)
    ranks = []
    for _ in range(num_repeats):
        # drawn on the CPU so that every device draws the same items
        draw = (torch.rand(num_query, num_groups, dtype=torch.float64, generator=generator).to(device) * sizes).long()
        drawn = groups.order[groups.starts + draw]  # (Q, P)
        match = member_item[first_kept[valid] + draw[queries, own[valid]]]  # (V,)
        drawn, match_dist = drawn[valid], dist[queries, match][:, None]
        drawn_dist = dist[queries[:, None], drawn]
        before = (drawn_dist < match_dist) | ((drawn_dist == match_dist) & (drawn < match[:, None]))
        before[torch.arange(len(queries), device=device), own[valid]] = False
        ranks.append(1 + before.sum(dim=1))
    return torch.stack(ranks)


def query_gallery_labels(dist: torch.Tensor, q_pids, q_camids, g_pids, g_camids) -> tuple[torch.Tensor, ...]:
    """(q_pids, q_camids, g_pids, g_camids) as int64 tensors on dist's device, each checked against
    its side of dist's (Q, G) shape."""
    num_query, num_gallery = dist.shape
    return (
        _labels("q_pids", q_pids, num_query, dist.device),
        _labels("q_camids", q_camids, num_query, dist.device),
        _labels("g_pids", g_pids, num_gallery, dist.device),
        _labels("g_camids", g_camids, num_gallery, dist.device),
    )


def _labels(name: str, value, length: int, device) -> torch.Tensor:
    labels = _inputs.as_tensor(name, value, 1, device)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer labels, got {labels.dtype}")
    if len(labels) != length:
        raise ValueError(f"{name} must have length {length} to match distmat, got {len(labels)}")
    # .long() wraps uint64 labels of 2^63 and more to negative ones: 2^64 - 1 became the junk label -1
    if labels.dtype == torch.uint64 and bool((labels.view(torch.int64) < 0).any()):
        raise ValueError(f"{name} must fit in int64: it holds a uint64 label of 2^63 or more")
    return labels.long()


def evaluate_rank(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank: int = 50,
    ap: str = "standard",
    protocol: str = "market1501",
    num_repeats: int = 10,
    seed: int = 0,
) -> RankResult:
    """Market-1501 CMC, mAP and mINP of a (Q, G) distance matrix (numpy or torch, CPU or CUDA,
    float16/32/64). ap="standard": non-interpolated AP (torchreid, fast-reid);
    ap="trapezoid": the official Market MATLAB AP, mean of (i / r_i + (i-1) / (r_i - 1)) / 2.

    protocol="cuhk03": the CMC is CUHK03's single-gallery-shot CMC, averaged over num_repeats
    (at most MAX_REPEATS = 10,000) seeded draws of one gallery item per identity (module
    docstring); mAP / mINP unchanged. num_repeats and seed are used by that protocol only.

    The CMC has min(max_rank, G) entries: a max_rank above the gallery size G is cut to G with a
    warning, as torchreid does (every valid query has matched within G ranks, so the CMC would only
    repeat 1 past it, and the work stays bounded by the gallery). Past the number of kept items
    (identities, for cuhk03) it stays at 1.
    """
    max_rank = _inputs.check_count("max_rank", max_rank, 1)
    _inputs.check_choice("ap", ap, AP_MODES)
    _inputs.check_choice("protocol", protocol, PROTOCOLS)
    num_repeats = _inputs.check_count(
        "num_repeats", num_repeats, 1, MAX_REPEATS, why=" (the draws run one after another)"
    )
    seed = _inputs.check_count("seed", seed, 0, 2**63 - 1)  # torch.Generator's range
    dist, max_rank = _distances(distmat, max_rank)
    num_query, num_gallery = dist.shape
    q_pids, q_camids, g_pids, g_camids = query_gallery_labels(dist, q_pids, q_camids, g_pids, g_camids)
    all_ap, first_ranks, inverse_penalty, num_skipped = _match_statistics(dist, q_pids, q_camids, g_pids, g_camids, ap)
    num_valid = num_query - num_skipped
    if num_valid == 0:
        raise ValueError(
            "no query has a match in the gallery (same pid on another camera); "
            "check q_pids / g_pids / q_camids / g_camids"
        )
    all_ap = torch.cat(all_ap).cpu().numpy()
    all_inp = torch.cat(inverse_penalty).cpu().numpy()
    if protocol == "cuhk03":
        first_ranks = single_shot_match_ranks(dist, q_pids, q_camids, g_pids, g_camids, num_repeats, seed)
    else:
        first_ranks = torch.cat(first_ranks)
    first_ranks = first_ranks.flatten().clamp_(max=max_rank + 1)
    first_rank_counts = torch.bincount(first_ranks, minlength=max_rank + 2)[1 : max_rank + 1]
    cmc = (first_rank_counts.cumsum(0).double() / len(first_ranks)).cpu().numpy()
    return RankResult(
        cmc=cmc,
        mAP=float(all_ap.mean()),
        mINP=float(all_inp.mean()),
        all_AP=all_ap,
        all_INP=all_inp,
        num_valid=num_valid,
        num_skipped=num_skipped,
    )


def _distances(distmat, max_rank: int) -> tuple[torch.Tensor, int]:
    """The checked (Q, G) distance tensor and the CMC length, max_rank cut to the gallery size."""
    dist = _inputs.as_tensor("distmat", distmat, 2)
    if not dist.is_floating_point():
        raise ValueError(f"distmat must hold floating-point distances, got {dist.dtype}")
    num_query, num_gallery = dist.shape
    if num_query == 0 or num_gallery == 0:
        raise ValueError(f"distmat is empty (shape {tuple(dist.shape)}): need at least one query and one gallery item")
    if max_rank > num_gallery:
        warnings.warn(
            f"evaluate_rank: max_rank {max_rank} exceeds the gallery size {num_gallery}; the CMC has "
            f"{num_gallery} entries",
            stacklevel=3,  # evaluate_rank's caller
        )
        max_rank = num_gallery
    return dist, max_rank


def _match_statistics(dist, q_pids, q_camids, g_pids, g_camids, ap: str):
    """Per valid query, over query chunks: AP, the rank of the first match and the inverse
    negative penalty (matches / rank of the last match); and the number of queries with no match."""
    device = dist.device
    num_query, num_gallery = dist.shape
    dtype = compute_dtype(dist)
    backend = _backend.resolve(None, device)
    use_kernel = backend in ("cpp", "cuda")
    groups = None if use_kernel else _IdentityGroups(g_pids)

    all_ap, first_ranks, inverse_penalty, num_skipped = [], [], [], 0
    # The kernel keeps only the matches' ranks, so it takes the whole matrix in one call.
    step = num_query if use_kernel else max(1, _CHUNK_ELEMENTS // num_gallery)
    for start in range(0, num_query, step):
        stop = min(start + step, num_query)
        chunk = dist[start:stop].to(dtype)
        if not bool(torch.isfinite(chunk.sum())):  # one cheap pass; the exact check only on failure
            check_finite("evaluate_rank", distmat=chunk)
        if use_kernel:
            query, rank, ordinal, num_matches = kernel_match_ranks(
                chunk, q_pids[start:stop], q_camids[start:stop], g_pids, g_camids, backend
            )
        else:
            query, rank, ordinal, num_matches = match_ranks(
                chunk, q_pids[start:stop], q_camids[start:stop], g_pids, g_camids, groups
            )
        valid = num_matches > 0
        num_skipped += int((~valid).sum())
        if len(query) == 0:
            continue
        rank, ordinal = rank.double(), ordinal.double()
        precision = ordinal / rank
        if ap == "trapezoid":
            # Precision just before the match: (i - 1) / (r - 1), or 1 at rank 1.
            precision = (precision + torch.where(rank > 1, (ordinal - 1) / (rank - 1).clamp_min(1), 1.0)) / 2
        ap_sum = torch.zeros(stop - start, dtype=torch.float64, device=device).index_add_(0, query, precision)
        matches = num_matches[valid].double()
        all_ap.append(ap_sum[valid] / matches)
        is_first = ordinal == 1
        is_last = ordinal == num_matches[query]
        first_ranks.append(rank[is_first].long())
        inverse_penalty.append(matches / rank[is_last])
    return all_ap, first_ranks, inverse_penalty, num_skipped
