"""Exact copies among pooled feature rows, at distance exactly 0 from each other as scipy's cdist gives them.

The GEMM formula |x|^2 + |y|^2 - 2 x.y leaves two equal rows a rounding residue apart (about 1e-6 |x|) while an
item's distance to itself is set to 0, so an item ranked before its copies instead of tying with them in index
order, and a group of copies straddling a neighbourhood's cut-off changed the re-ranked distances (by up to 0.47).
`copy_groups` finds the groups (each row's smallest equal row), and the feature re-ranking sets the distances
within a group to 0 wherever it holds one: in its scan's tiles and candidate lists, its pair distances and its
query x gallery block.
"""

from typing import Optional

import torch

_HASHED_VALUES = 64


def copy_groups(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Each row's group as the smallest index of the rows equal to it value by value (-0.0 and 0.0 alike), or
    None when all rows differ. An exact integer hash of the bits of up to _HASHED_VALUES values spread over
    each row finds the candidates (equal rows hash alike, whatever the summation order; a few percent of a
    re-ranking's time at Market scale); torch.unique groups them by their whole rows, so a collision, or rows
    equal in the hashed words only, costs time, never a wrong group."""
    n = len(x)
    if n < 2:
        return None
    hashed = x[:, :: max(1, x.shape[1] // _HASHED_VALUES)][:, :_HASHED_VALUES]
    words = (hashed + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes 0.0
    weights = torch.randint(1, 1 << 16, (words.shape[1],), generator=torch.Generator().manual_seed(0))
    keys = (words * weights.to(x.device)).sum(dim=1)  # each product below 2^47: no overflow
    sorted_keys, order = torch.sort(keys)
    repeated = sorted_keys[1:] == sorted_keys[:-1]
    if not bool(repeated.any()):
        return None
    shared = torch.zeros(n, dtype=torch.bool, device=x.device)
    shared[:-1] |= repeated
    shared[1:] |= repeated
    candidates = order[shared]
    _, inverse = torch.unique(x[candidates] + 0.0, dim=0, return_inverse=True)
    first = torch.full((len(candidates),), n, dtype=torch.int64, device=x.device)
    first = first.scatter_reduce(0, inverse, candidates, "amin")
    groups = torch.arange(n, device=x.device)
    groups[candidates] = first[inverse]
    return None if bool((groups == torch.arange(n, device=x.device)).all()) else groups


def zero_copies(distances: torch.Tensor, groups: Optional[torch.Tensor], rows, cols) -> torch.Tensor:
    """``distances`` of the pairs (rows[i], cols[i]), or of the block rows x cols (2-D), with those within a
    group of copies set to 0, in place."""
    if groups is not None:
        if distances.dim() == 2:
            distances[groups[rows, None] == groups[None, cols]] = 0
        else:
            distances[groups[rows] == groups[cols]] = 0
    return distances


def tie_copies(values: torch.Tensor, indices: torch.Tensor, groups: Optional[torch.Tensor]) -> None:
    """Rows' candidate lists (N, M), in (value, index) order, with the copies of the row's item at value 0, in
    place: each row that holds a copy is sorted again; a row whose list holds copies only takes its group's first
    M members by index (its group is larger than M: which M the kernel kept was the rounding's choice)."""
    if groups is None:
        return
    rows = (torch.bincount(groups, minlength=len(groups))[groups] > 1).nonzero().squeeze(1)
    row_indices = indices[rows]
    same = groups[row_indices] == groups[rows, None]
    row_values = torch.where(same, torch.zeros((), dtype=values.dtype, device=values.device), values[rows])
    by_index = row_indices.argsort(dim=1)
    row_values, row_indices = row_values.gather(1, by_index), row_indices.gather(1, by_index)
    by_value = row_values.argsort(dim=1, stable=True)
    values[rows], indices[rows] = row_values.gather(1, by_value), row_indices.gather(1, by_value)
    full = rows[same.all(dim=1)]
    for group in groups[full].unique().tolist():
        members = (groups == group).nonzero().squeeze(1)[: indices.shape[1]]
        indices[full[groups[full] == group]] = members
