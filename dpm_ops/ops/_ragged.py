"""Vectorised expansion of ragged segments (CSR rows, CSC columns, identity groups)."""

import torch


def expand_segments(starts: torch.Tensor, lengths: torch.Tensor):
    """Every element of the segments [starts[s], starts[s] + lengths[s]), in segment order.

    Returns (segment, position): the segment each element belongs to and its position in the
    underlying array.
    """
    lengths = lengths.long()
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    segment_begin = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(len(segment), device=lengths.device) - segment_begin[segment]
    return segment, starts.long()[segment] + offset


def segment_starts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts
