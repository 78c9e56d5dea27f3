"""The sort-free Market-1501 evaluator kernel as a custom op (C++ / CUDA kernels in csrc/rank/;
caller: dpm_ops/evaluation/rank.py; its torch version, rank_reference.py, runs where the kernels do not)."""

import torch

from ._declare import declare
from .kreciprocal import ragged
from .rank_reference import match_ranks_reference


def _fake_match_ranks(distmat, q_pids, g_pids, q_camids, g_camids):
    return q_pids.new_empty((distmat.shape[0] + 1,), dtype=torch.long), ragged(q_pids, torch.long)


# For every query, the ranks of its matches (same pid, other camera) among the kept gallery items
# (same pid and camera removed), ordered by (distance, index): CSR (offsets, ranks).
MATCH_RANKS = declare(
    "match_ranks",
    "(Tensor distmat, Tensor q_pids, Tensor g_pids, Tensor q_camids, Tensor g_camids)"
    " -> (Tensor offsets, Tensor ranks)",
    _fake_match_ranks,
    reference=match_ranks_reference,
)
