"""Fake (meta) registrations of the evaluation kernels' ops, whose output sizes depend on the data.

The C++ / CUDA kernels of ``kreciprocal_*`` (csrc/kreciprocal/) and ``match_ranks`` (csrc/rank/)
return CSR-style ragged results: their fake functions give the ragged lengths as unbacked symbolic
sizes, so the ops trace under torch.compile / FakeTensorMode like the others. They are called by
dpm_ops.evaluation (rerank.py, rank.py); they have no autograd (the results are indices and
non-differentiable re-ranking weights).
"""

import torch

from .. import _backend


def _ragged(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of a data-dependent length."""
    return like.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=dtype)


def _fake_expand(neighbours, k1, half_k1):
    return neighbours.new_empty((neighbours.shape[0] + 1,), dtype=torch.long), _ragged(neighbours, torch.long)


def _fake_pair_sqdist(features, cand_values, cand_indices, row_ptr, cols):
    return cols.new_empty(cols.shape, dtype=torch.float32)


def _fake_query_expansion(row_ptr, cols, values, sources):
    return (
        sources.new_empty((sources.shape[0] + 1,), dtype=torch.long),
        _ragged(cols, torch.long),
        _ragged(cols, torch.float32),
    )


def _fake_jaccard_blend_(out, row_ptr, cols, values, lambda_value, row_scale=None):
    return None


def _fake_match_ranks(distmat, q_pids, g_pids, q_camids, g_camids):
    return q_pids.new_empty((distmat.shape[0] + 1,), dtype=torch.long), _ragged(q_pids, torch.long)


if _backend.extension()[0] is not None:
    for name, fake in (
        ("kreciprocal_expand", _fake_expand),
        ("kreciprocal_pair_sqdist", _fake_pair_sqdist),
        ("kreciprocal_query_expansion", _fake_query_expansion),
        ("kreciprocal_jaccard_blend_", _fake_jaccard_blend_),
        ("match_ranks", _fake_match_ranks),
    ):
        torch.library.register_fake(getattr(torch.ops.dpm_ops, name).default)(fake)
