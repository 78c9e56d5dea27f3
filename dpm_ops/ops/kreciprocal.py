"""The sparse stages of k-reciprocal re-ranking as custom ops (C++ / CUDA kernels in csrc/kreciprocal/;
callers: dpm_ops/evaluation/rerank.py; their torch versions, kreciprocal_reference.py, run where the
kernels do not). Sets and weights are CSR: row_ptr (N + 1), cols, values, whose lengths
depend on the data: the fake functions give them as unbacked symbolic sizes, so the ops trace under
torch.compile / FakeTensorMode like the others. No autograd: the results are indices and
non-differentiable re-ranking weights.
"""

import torch

from ._declare import declare
from .kreciprocal_reference import (
    kreciprocal_expand_reference,
    kreciprocal_jaccard_blend_reference_,
    kreciprocal_pair_sqdist_reference,
    kreciprocal_query_expansion_reference,
)


def ragged(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fake 1-D tensor of a data-dependent length."""
    return like.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=dtype)


def _fake_expand(neighbours, k1, half_k1):
    return neighbours.new_empty((neighbours.shape[0] + 1,), dtype=torch.long), ragged(neighbours, torch.long)


def _fake_pair_sqdist(features, cand_values, cand_indices, row_ptr, cols):
    return cols.new_empty(cols.shape, dtype=torch.float32)


def _fake_query_expansion(row_ptr, cols, values, sources):
    return (
        sources.new_empty((sources.shape[0] + 1,), dtype=torch.long),
        ragged(cols, torch.long),
        ragged(cols, torch.float32),
    )


def _fake_jaccard_blend_(out, row_ptr, cols, values, lambda_value, row_scale=None):
    return None


# R*(i) of every item from its (N, W) neighbour lists, as CSR (row_ptr, cols).
KRECIPROCAL_EXPAND = declare(
    "kreciprocal_expand",
    "(Tensor neighbours, int k1, int half_k1) -> (Tensor row_ptr, Tensor cols)",
    _fake_expand,
    reference=kreciprocal_expand_reference,
)
# The squared distance of every (row, col) entry of the CSR sets, in float32.
KRECIPROCAL_PAIR_SQDIST = declare(
    "kreciprocal_pair_sqdist",
    "(Tensor features, Tensor cand_values, Tensor cand_indices, Tensor row_ptr, Tensor cols) -> Tensor",
    _fake_pair_sqdist,
    reference=kreciprocal_pair_sqdist_reference,
)
# V_qe[i]: the mean of the weight rows V[sources[i, :]], as CSR.
KRECIPROCAL_QUERY_EXPANSION = declare(
    "kreciprocal_query_expansion",
    "(Tensor row_ptr, Tensor cols, Tensor values, Tensor sources) -> (Tensor row_ptr, Tensor cols, Tensor values)",
    _fake_query_expansion,
    reference=kreciprocal_query_expansion_reference,
)
# out (Q, G), the normalised distance, blended in place with the Jaccard distance of the weights.
KRECIPROCAL_JACCARD_BLEND_ = declare(
    "kreciprocal_jaccard_blend_",
    "(Tensor(a!) out, Tensor row_ptr, Tensor cols, Tensor values, float lambda_value, Tensor? row_scale=None) -> ()",
    _fake_jaccard_blend_,
    reference=kreciprocal_jaccard_blend_reference_,
)
