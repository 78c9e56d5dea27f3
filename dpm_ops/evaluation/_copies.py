"""Exact copies among pooled feature rows, at distance exactly 0 from each other as scipy's cdist gives them.

The GEMM formula |x|^2 + |y|^2 - 2 x.y leaves two equal rows a rounding residue apart (about 1e-6 |x|) while an
item's distance to itself is set to 0, so an item ranked before its copies instead of tying with them in index
order, and a group of copies straddling a neighbourhood's cut-off changed the re-ranked distances (by up to 0.47).
`copy_groups` finds the groups (each row's smallest equal row), and the feature re-ranking sets the distances
within a group to 0 wherever it holds one: in its scan's tiles and candidate lists, its pair distances and its
query x gallery block; `tie_copies` also gives a row's distances to the copies of another item one value.
"""

from typing import Optional

import torch

from ._select import sort_by_value_then_index

_HASHED_VALUES = 64
_CHUNK_ELEMENTS = 1 << 22  # tie_copies compares a chunk of rows' lists pairwise: (rows, M, M) booleans


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
    """Rows' candidate lists (N, M), in (value, index) order, with the copies of the row's item at value 0 and the
    copies of any other item at one value (the smallest the list holds for them), in place: the search computed
    a copy's distance in another tile or stage, a rounding residue off (the certified search's stage 2 against
    the query x gallery GEMM), so copies ranked in rounding order instead of by index. Each row holding copies
    is sorted again; a row whose list holds its item's copies only takes its group's first M members by index
    (its group is larger than M: which M the kernel kept was the rounding's choice)."""
    if groups is None:
        return
    member = groups[indices]
    own = member == groups[:, None]
    by_group = member.sort(dim=1).values
    rows = (by_group[:, 1:] == by_group[:, :-1]).any(dim=1).nonzero().squeeze(1)  # a group held twice (own too)
    width = indices.shape[1]
    for chunk in rows.split(max(1, _CHUNK_ELEMENTS // (width * width))):
        row_indices, row_member = indices[chunk], member[chunk]
        same = row_member[:, :, None] == row_member[:, None, :]
        row_values = torch.where(same, values[chunk, None, :], torch.inf).amin(dim=2)
        row_values[own[chunk]] = 0
        values[chunk], indices[chunk] = sort_by_value_then_index(row_values, row_indices)
    shared = torch.bincount(groups, minlength=len(groups))[groups] > 1
    full = (own.all(dim=1) & shared).nonzero().squeeze(1)
    for group in groups[full].unique().tolist():
        members = (groups == group).nonzero().squeeze(1)[:width]
        indices[full[groups[full] == group]] = members
