"""Exact k-smallest selection over streamed distance tiles, ties broken by (value, index).

`RunningSmallest` keeps, for every row, the m smallest values offered so far (any choice
among equal values) while tiles of a distance matrix stream past. Once a row holds m values,
only entries below its current m-th value can matter: a tile is scanned as minima of groups
of 8 columns, and only groups whose minimum beats the row's threshold are opened, so a tile
costs about one pass instead of a per-row top-k.

`resolve_smallest` then makes the choice exact: candidates are ordered by (transformed
value, index), and the rare rows where an equal value could sit just outside the candidates
(`TIE_MARGIN` extra candidates make this rare) are re-sorted in full. The transform may be any
monotone non-decreasing map (sqrt of a squared distance, division by a row maximum): float
rounding can merge distinct raw values, and the boundary check covers that too.

These loops are the ones a fused distance + top-k kernel replaces.
"""

import torch

from ..ops.rank_reference import order_keys

TIE_MARGIN = 4
STREAM_TILE = 2048  # columns per tile offered by smallest_in_rows
_GROUP = 8


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


class RunningSmallest:
    """For each of `num_rows` rows, the `count` smallest values offered so far and their column
    ids (`values`, `indices`, (num_rows, count), unordered; +inf / -1 until filled)."""

    def __init__(self, num_rows: int, count: int, dtype: torch.dtype, device):
        self.count = count
        self.values = torch.full((num_rows, count), float("inf"), dtype=dtype, device=device)
        self.indices = torch.full((num_rows, count), -1, dtype=torch.long, device=device)

    def offer(self, start: int, stop: int, block: torch.Tensor, column_offset: int, transposed: bool = False):
        """Offer a tile to rows start..stop: block is (rows, columns), or (columns, rows) when
        transposed; the column ids are column_offset + position."""
        threshold = self.values[start:stop].amax(dim=1)
        if bool(torch.isinf(threshold).any()):
            values, position = smallest(block, self.count, dim=0 if transposed else 1)
            if transposed:
                values, position = values.T, position.T
            self.values[start:stop], self.indices[start:stop] = merge_smallest(
                self.values[start:stop], self.indices[start:stop], values, position + column_offset, self.count
            )
            return
        rows, columns = self._below(block, threshold, transposed)
        values = block[columns, rows] if transposed else block[rows, columns]
        below = values < threshold[rows]
        self._merge(start, stop, rows[below], columns[below] + column_offset, values[below])

    @staticmethod
    def _below(block: torch.Tensor, threshold: torch.Tensor, transposed: bool):
        """(row, column) of every entry in a group whose minimum is below the row's threshold.

        Group j holds the columns j, j + s, ..., j + 7 s (s = columns // 8): strided groups
        reduce over a middle dimension, which vectorises, where runs of 8 adjacent columns do
        not. The ragged last columns are compared one by one.
        """
        num_columns = block.shape[0 if transposed else 1]
        grouped = num_columns - num_columns % _GROUP
        stride = grouped // _GROUP
        if transposed:
            minima = block[:grouped].unflatten(0, (_GROUP, stride)).amin(dim=0).T
            tail = block[grouped:].T
        else:
            minima = block[:, :grouped].unflatten(1, (_GROUP, stride)).amin(dim=1)
            tail = block[:, grouped:]
        rows, groups = torch.nonzero(minima < threshold[:, None], as_tuple=True)
        tail_rows, tail_columns = torch.nonzero(tail < threshold[:, None], as_tuple=True)
        members = torch.arange(_GROUP, device=block.device) * stride
        rows = torch.cat([rows.repeat_interleave(_GROUP), tail_rows])
        columns = torch.cat([(groups[:, None] + members).flatten(), tail_columns + grouped])
        return rows, columns

    def _merge(self, start, stop, rows, columns, values):
        """Merge ragged candidates (local row, column id, value) into the rows' lists."""
        num_rows, count = stop - start, self.count
        own_rows = torch.arange(num_rows, device=rows.device).repeat_interleave(count)
        all_rows = torch.cat([own_rows, rows])
        all_values = torch.cat([self.values[start:stop].flatten(), values])
        all_indices = torch.cat([self.indices[start:stop].flatten(), columns])
        order = torch.sort((all_rows << 32) | order_keys(all_values)).indices  # by (row, value)
        per_row = count + torch.bincount(rows, minlength=num_rows)
        first = torch.cumsum(per_row, 0) - per_row
        take = order[(first[:, None] + torch.arange(count, device=rows.device)).flatten()]
        self.values[start:stop] = all_values[take].view(num_rows, count)
        self.indices[start:stop] = all_indices[take].view(num_rows, count)


def smallest_in_rows(block: torch.Tensor, count: int):
    """The `count` smallest entries of every row of a wide block (unordered, ties arbitrary),
    streaming column tiles through `RunningSmallest`."""
    running = RunningSmallest(len(block), min(count, block.shape[1]), block.dtype, block.device)
    for start in range(0, block.shape[1], STREAM_TILE):
        running.offer(0, len(block), block[:, start : start + STREAM_TILE], start)
    return running.values, running.indices


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
