"""Plain-PyTorch reference of the Market-1501 evaluator kernel ``match_ranks`` (csrc/rank/): for every
query, the ranks of its matches (same pid, other camera) among the kept gallery items (same pid and
camera removed), ordered by (distance, gallery index); ranks count kept items only. The evaluation
(dpm_ops/evaluation/rank.py) runs match_ranks below on chunks of queries where the kernel does not run.
"""

import torch

from ._ragged import expand_segments, segment_starts


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) ordered like `values`, equal exactly where the values are equal
    (-0.0 == +0.0); integer keys sort several times faster than floats on CPU."""
    if values.dtype == torch.float64:
        return torch.unique(values, return_inverse=True)[1]
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() + 2**31  # IEEE order as signed integers


class IdentityGroups:
    """Gallery items grouped by pid."""

    def __init__(self, g_pids: torch.Tensor):
        self.order = torch.argsort(g_pids, stable=True)  # members in gallery-index order
        self.pids, self.counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.starts = segment_starts(self.counts)

    def group_of(self, q_pids: torch.Tensor) -> torch.Tensor:
        """Each query's group: its pid's, or a neighbour's where the gallery lacks the pid (check pids[group])."""
        return torch.searchsorted(self.pids, q_pids).clamp_(max=len(self.pids) - 1)

    def members(self, q_pids: torch.Tensor):
        """(query position, gallery index) of every gallery item sharing a query's pid."""
        group = self.group_of(q_pids)
        lengths = torch.where(self.pids[group] == q_pids, self.counts[group], 0)
        query, position = expand_segments(self.starts[group], lengths)
        return query, self.order[position]


def running_count(flags: torch.Tensor, segment_begin: torch.Tensor, segment: torch.Tensor):
    """Inclusive running count of `flags` (0/1) restarted at every segment of consecutive entries."""
    running = torch.cumsum(flags, 0)
    before_segment = (running - flags)[segment_begin]
    return running - before_segment[segment]


def match_ranks(dist: torch.Tensor, q_pids, q_camids, g_pids, g_camids, groups: IdentityGroups):
    """Every match of a chunk of queries with its rank and its ordinal among the query's matches.

    dist (B, G) distances of the queries with labels q_pids / q_camids (B,).
    Returns (query, rank, ordinal, num_matches (B,)), the first three per match, grouped by
    query in rank order.
    """
    num_rows = len(dist)
    member_query, member_item = groups.members(q_pids)
    is_match = g_camids[member_item] != q_camids[member_query]
    farthest = torch.full((num_rows,), -float("inf"), dtype=dist.dtype, device=dist.device)
    farthest.scatter_reduce_(0, member_query[is_match], dist[member_query[is_match], member_item[is_match]], "amax")

    query, item = torch.nonzero(dist <= farthest[:, None], as_tuple=True)  # row-major: index ascending
    if len(query) == 0:
        return query, query, query, torch.zeros(num_rows, dtype=torch.long, device=dist.device)
    order = torch.sort((query << 32) | order_keys(dist[query, item]), stable=True).indices  # (query, distance, index)
    query, item = query[order], item[order]
    same_pid = g_pids[item] == q_pids[query]
    kept = ~(same_pid & (g_camids[item] == q_camids[query]))
    match = same_pid & kept

    num_candidates = torch.bincount(query, minlength=num_rows)
    segment_begin = segment_starts(num_candidates).clamp_(max=len(query) - 1)
    rank = running_count(kept.long(), segment_begin, query)
    ordinal = running_count(match.long(), segment_begin, query)
    return query[match], rank[match], ordinal[match], torch.bincount(query[match], minlength=num_rows)


def match_ranks_reference(distmat, q_pids, g_pids, q_camids, g_camids):
    """The op's result from the torch path: CSR (offsets (Q + 1), ranks), each query's ranks ascending."""
    _, ranks, _, num_matches = match_ranks(distmat, q_pids, q_camids, g_pids, g_camids, IdentityGroups(g_pids))
    offsets = torch.cat([num_matches.new_zeros(1), torch.cumsum(num_matches, 0)])
    return offsets, ranks
