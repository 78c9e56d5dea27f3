"""Sparse stages of k-reciprocal re-ranking on fixed-width neighbour lists.

Input of every stage: `neighbours`, (N, W) int64, each row's nearest items ordered by
(normalised distance, index), W >= k1 + 1 (or N). The sets and weights live in sparse
(row, col, value) lists sorted by (row, col); nothing here is N x N. Each function is one
hot loop that the C++ and CUDA kernels of csrc/kreciprocal/ replace with the same maths, on CPU
and CUDA tensors alike (dpm_ops/evaluation/rerank.py); these torch versions run where the
extension, or its CUDA part for GPU tensors, is missing. The ``*_reference`` functions at the end
are the stages on the kernels' CSR arguments: what backend "reference" of the ops runs.

The k-reciprocal re-ranking of Zhong et al. (CVPR 2017): R(i, k) the items among i's k + 1 nearest
that hold i among theirs, R*(i) its expansion, V the Gaussian weights of R*(i), the query expansion
averages V over each item's k2 nearest, and the final distance blends the Jaccard distance of the
weights with the original one.
"""

import torch

from .._precision import compute_dtype
from ._ragged import expand_segments, segment_starts

_ELEMENT_BUDGET = 1 << 24  # temporaries per chunk, in elements
_MEMBERSHIP_BUDGET = 1 << 26  # bytes of the membership bitmap
_FEATURE_PAIR_CHUNK = 1 << 12  # pairs whose distance is computed from the features at a time


def row_chunks(num_rows: int, elements_per_row: int, budget: int):
    """(start, stop) of consecutive row chunks, each of at most `budget` elements (at least one row)."""
    step = max(1, budget // max(1, elements_per_row))
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


def reciprocal_neighbours(neighbours: torch.Tensor, k: int):
    """N(i, k) = the first k + 1 neighbours, and the mask of those j with i in N(j, k)."""
    forward = neighbours[:, : k + 1]
    width = forward.shape[1]
    reciprocal = torch.empty(forward.shape, dtype=torch.bool, device=forward.device)
    for start, stop in row_chunks(len(forward), width * width, _ELEMENT_BUDGET):
        items = torch.arange(start, stop, device=forward.device)
        backward = forward[forward[start:stop]]  # (rows, width, width)
        reciprocal[start:stop] = (backward == items[:, None, None]).any(dim=2)
    return forward, reciprocal


def expanded_neighbourhoods(neighbours: torch.Tensor, k1: int, half_k1: int):
    """R*(i) as (rows, cols), sorted by (row, col).

    R*(i) = R(i, k1) united with every R(c, half_k1), c in R(i, k1), that shares more than
    two thirds of its items with R(i, k1) (the integer test 3 |overlap| > 2 |R(c, half_k1)|).
    """
    num_items = len(neighbours)
    device = neighbours.device
    forward, reciprocal = reciprocal_neighbours(neighbours, k1)
    half_forward, half_reciprocal = reciprocal_neighbours(neighbours, half_k1)
    half_size = half_reciprocal.sum(dim=1)
    chunk_rows = max(
        1, min(num_items, _ELEMENT_BUDGET // forward.shape[1] // half_forward.shape[1], _MEMBERSHIP_BUDGET // num_items)
    )
    # Row-local membership bitmap of R(i, k1): set for a chunk, probed, then cleared again, so
    # it is zeroed once whatever N.
    member = torch.zeros(chunk_rows * num_items, dtype=torch.bool, device=device)
    keys = []
    for start in range(0, num_items, chunk_rows):
        stop = min(start + chunk_rows, num_items)
        own, own_mask = forward[start:stop], reciprocal[start:stop]
        local = torch.arange(stop - start, device=device)[:, None] * num_items
        own_slots = (local + own)[own_mask]
        member[own_slots] = True
        # For every candidate c = own[i, p]: the items t of N(c, half_k1), which of them are in
        # R(c, half_k1), and which are in R(i, k1).
        candidates = half_forward[own]
        candidate_mask = half_reciprocal[own]
        in_own_set = member[local[:, :, None] + candidates]
        member[own_slots] = False
        overlap = (in_own_set & candidate_mask).sum(dim=2)
        accepted = own_mask & (3 * overlap > 2 * half_size[own])
        added = accepted[..., None] & candidate_mask
        first_key = start * num_items
        keys.append(first_key + torch.unique(torch.cat([own_slots, (local[:, :, None] + candidates)[added]])))
    keys = torch.cat(keys)
    return keys // num_items, keys % num_items


def encode_weights(rows: torch.Tensor, distances: torch.Tensor, num_items: int) -> torch.Tensor:
    """V[i, j] = exp(-d(i, j)) / sum over R*(i), for the (rows, cols) entries of R*."""
    kernel = torch.exp(-distances)
    totals = torch.zeros(num_items, dtype=kernel.dtype, device=kernel.device).index_add_(0, rows, kernel)
    return kernel / totals[rows]


def softmax_weights(rows: torch.Tensor, squared: torch.Tensor, num_items: int) -> torch.Tensor:
    """V[i, j] = softmax over R*(i) of -d²(i, j) (fast-reid's / OpenUnReID's compute_jaccard_distance:
    un-normalised squared distances), shifted by each row's smallest as softmax is, so that large
    distances do not all underflow to 0 / 0."""
    smallest = torch.full((num_items,), float("inf"), dtype=squared.dtype, device=squared.device)
    smallest.scatter_reduce_(0, rows, squared, "amin")
    return encode_weights(rows, squared - smallest[rows], num_items)


def query_expansion(rows, cols, values, sources: torch.Tensor, num_items: int):
    """V_qe[i] = mean of the rows V[sources[i, t]] (t < sources.shape[1]), as sorted (rows, cols, values).

    Contributions to one entry are summed in t order, as numpy's mean over axis 0 does.
    """
    row_counts = torch.bincount(rows, minlength=num_items)
    row_starts = segment_starts(row_counts)
    num_sources = sources.shape[1]
    out_rows, out_cols, out_values = [], [], []
    average_row = max(1, len(rows) // num_items)
    for start, stop in row_chunks(num_items, num_sources * average_row * 4, _ELEMENT_BUDGET):
        block = sources[start:stop].reshape(-1)
        segment, position = expand_segments(row_starts[block], row_counts[block])
        owner = start + torch.div(segment, num_sources, rounding_mode="floor")
        keys, inverse = torch.unique(owner * num_items + cols[position], return_inverse=True)
        sums = torch.zeros(len(keys), dtype=values.dtype, device=values.device).index_add_(0, inverse, values[position])
        out_rows.append(keys // num_items)
        out_cols.append(keys % num_items)
        out_values.append(sums / num_sources)
    return torch.cat(out_rows), torch.cat(out_cols), torch.cat(out_values)


def jaccard_blend_(out: torch.Tensor, rows, cols, values, lambda_value: float) -> torch.Tensor:
    """out (Q, G) holds the normalised query-gallery distance d; overwritten in place by
    (1 - lambda) * Jaccard + lambda * d, Jaccard = 1 - m / (2 - m), m = sum_k min(V[q,k], V[g,k]).

    m is a sparse min-sum: every non-zero V[q, k] of a query meets the gallery rows holding
    column k (an inverted index, CSC of the gallery rows); pairs with no common column keep
    m = 0, i.e. Jaccard 1.
    """
    num_query, num_gallery = out.shape
    num_items = num_query + num_gallery
    in_gallery = rows >= num_query
    gallery_cols = cols[in_gallery]
    by_column = torch.argsort(gallery_cols, stable=True)
    gallery_rows = rows[in_gallery][by_column] - num_query
    gallery_values = values[in_gallery][by_column]
    column_counts = torch.bincount(gallery_cols, minlength=num_items)
    column_starts = segment_starts(column_counts)
    query_row_starts = torch.searchsorted(rows, torch.arange(num_query + 1, device=rows.device))

    keep, jaccard_weight = lambda_value, 1 - lambda_value
    for start, stop in row_chunks(num_query, num_gallery, _ELEMENT_BUDGET):
        first, last = query_row_starts[start].item(), query_row_starts[stop].item()
        entry_rows, entry_cols, entry_values = rows[first:last], cols[first:last], values[first:last]
        entry, position = expand_segments(column_starts[entry_cols], column_counts[entry_cols])
        overlap = torch.zeros((stop - start) * num_gallery, dtype=out.dtype, device=out.device)
        overlap.index_add_(
            0,
            (entry_rows[entry] - start) * num_gallery + gallery_rows[position],
            torch.minimum(entry_values[entry], gallery_values[position]),
        )
        # Most pairs share no column (m = 0, Jaccard 1): blend those densely, the rest sparsely,
        # with the reference's operation order so both give the same float32 numbers.
        shared = torch.nonzero(overlap).flatten()
        m = overlap[shared]
        block = out[start:stop].view(-1)
        blended = (1 - m / (2 - m)) * jaccard_weight + block[shared] * keep
        block.mul_(keep).add_(jaccard_weight)
        block[shared] = blended
    return out


def pair_sqdist(features, norms, cand_values, cand_indices, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Squared distances (float32) of the pairs (rows, cols). Most pairs are in the candidate lists
    (cand_indices, cand_values: each row's nearest items and their squared distances), in either
    direction (the distance is symmetric); the others are computed from the features and their
    squared norms, a few thousand at a time."""
    squared = torch.empty(len(rows), dtype=torch.float32, device=rows.device)
    missing = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
    for owner, other in ((rows, cols), (cols, rows)):
        hit = cand_indices[owner] == other[:, None]
        found = hit.any(dim=1) & missing
        slot = hit[found].long().argmax(dim=1, keepdim=True)
        squared[found] = cand_values[owner[found]].gather(1, slot)[:, 0]
        missing &= ~found
    for pairs in torch.nonzero(missing).flatten().split(_FEATURE_PAIR_CHUNK):
        r, c = rows[pairs], cols[pairs]
        dots = (features[r] * features[c]).sum(dim=1)
        squared[pairs] = (norms[c] - 2 * dots + norms[r]).clamp_min_(0.0).to(torch.float32).masked_fill_(r == c, 0.0)
    return squared


def csr_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """The row of every entry of a CSR set."""
    return torch.repeat_interleave(torch.arange(len(row_ptr) - 1, device=row_ptr.device), row_ptr.diff())


def csr_row_ptr(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """row_ptr (num_rows + 1) of entries sorted by row."""
    return torch.cat([rows.new_zeros(1), torch.cumsum(torch.bincount(rows, minlength=num_rows), 0)])


def kreciprocal_expand_reference(neighbours, k1, half_k1):
    rows, cols = expanded_neighbourhoods(neighbours, k1, half_k1)
    return csr_row_ptr(rows, len(neighbours)), cols


def kreciprocal_pair_sqdist_reference(features, cand_values, cand_indices, row_ptr, cols):
    x = features.to(compute_dtype(features))
    return pair_sqdist(x, (x * x).sum(dim=1), cand_values.float(), cand_indices, csr_rows(row_ptr), cols)


def kreciprocal_query_expansion_reference(row_ptr, cols, values, sources):
    num_items = len(row_ptr) - 1
    rows, cols, values = query_expansion(csr_rows(row_ptr), cols, values.float(), sources, num_items)
    return csr_row_ptr(rows, num_items), cols, values


def kreciprocal_jaccard_blend_reference_(out, row_ptr, cols, values, lambda_value, row_scale=None):
    """jaccard_blend_ of `out` (Q, G), first divided by row_scale (Q,) where given."""
    if row_scale is not None:
        out.div_(row_scale[:, None])
    jaccard_blend_(out, csr_rows(row_ptr), cols, values.float(), lambda_value)
