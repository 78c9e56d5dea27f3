"""Exact k-smallest selection with ties broken by (value, index).

`torch.topk` leaves the order of equal values unspecified. The selection here is exact anyway:
take a few more candidates than needed (`TIE_MARGIN`), order them by (value, index), and
re-sort in full only the rare rows where an equal value could sit just outside the candidates.

The candidates may be chosen on a *raw* value and ranked on a monotone non-decreasing
transform of it (sqrt of a squared distance, division by a row maximum): float rounding can
make distinct raw values equal after the transform, and the boundary check covers that too.
These loops are the ones a fused distance + top-k kernel replaces.
"""

import torch

TIE_MARGIN = 4


def smallest(values: torch.Tensor, count: int, dim: int = 1):
    """The `count` smallest entries along `dim`, unordered; ties at the boundary arbitrary."""
    count = min(count, values.shape[dim])
    return torch.topk(values, count, dim=dim, largest=False, sorted=False)


def merge_smallest(best_values, best_indices, new_values, new_indices, count: int):
    """Keep the `count` smallest of two candidate lists per row (rows of equal length)."""
    values = torch.cat([best_values, new_values], dim=1)
    indices = torch.cat([best_indices, new_indices], dim=1)
    values, position = smallest(values, count)
    return values, indices.gather(1, position)


def sort_by_value_then_index(values: torch.Tensor, indices: torch.Tensor):
    by_index = torch.argsort(indices, dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    values, by_value = torch.sort(values, dim=1, stable=True)
    return values, indices.gather(1, by_value)


def resolve_smallest(raw_values, indices, k: int, num_columns: int, transform, full_rows):
    """Exact k smallest of transform(raw) per row, sorted by (transformed value, index).

    raw_values / indices: for each row, m >= k candidates that are the m smallest raw values
    of the row (any choice among ties), out of `num_columns`.
    transform(values, rows): the monotone map applied to `values` of the rows `rows`.
    full_rows(rows): the transformed values of whole rows, (len(rows), num_columns).
    """
    rows = torch.arange(raw_values.shape[0], device=raw_values.device)
    values, indices = sort_by_value_then_index(transform(raw_values, rows), indices)
    if raw_values.shape[1] < num_columns:
        # Every left-out item has a raw value >= the largest candidate, so a transformed value
        # >= this bound; a k-th value below it cannot tie with anything left out.
        bound = transform(raw_values.max(dim=1, keepdim=True).values, rows)[:, 0]
        ambiguous = torch.nonzero(values[:, k - 1] >= bound).flatten()
        if ambiguous.numel():
            exact_values, exact_indices = torch.sort(full_rows(ambiguous), dim=1, stable=True)
            values[ambiguous, :k] = exact_values[:, :k].to(values.dtype)
            indices[ambiguous, :k] = exact_indices[:, :k]
    return values[:, :k], indices[:, :k]
