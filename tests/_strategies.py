"""Hypothesis strategies for bad and extreme input, shared by the property tests (test_ops_evaluation_properties.py,
and the knn ones): random shapes with 0 and 1 included, float dtypes, values of every magnitude
from 1e-30 to float32's limit, and NaN / inf planted at random places.

The tests built on them assert one property: an op gives the correct result (against the reference
backend or a float64 truth) or raises a ValueError; nothing else (no TypeError, no NaN, no crash).
"""

import math

import hypothesis.strategies as st
import torch

import dpm_ops

FULL_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Multipliers of standard normal values: ordinary, underflowing squares (1e-30), large but safe (1e10),
# around the float32 square-overflow limit (~9.2e18, row_norm_limit), and past float16 / float32 range.
SCALES = (1.0, 1e-30, 1e-3, 1e10, 1e19, 1e30, 3e38)
TAME_SCALE = 1e10  # at or below it, finite values in a full dtype are valid input for every op
POISONS = (math.nan, math.inf, -math.inf)

# Relative accuracy each output dtype is held to against a float64 truth.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def sizes(low: int = 0, high: int = 5):
    """Dimension sizes; hypothesis shrinks towards `low`, 0 and 1 are drawn often."""
    return st.integers(low, high)


def dtypes(half: bool = True):
    return st.sampled_from(FULL_DTYPES + (HALF_DTYPES if half else ()))


def backends(*names):
    """The named backends this process can run on CPU tensors."""
    available = dpm_ops.backends()
    usable = [n for n in names if available[n][0] and n != "cuda"]
    return st.sampled_from(usable)


@st.composite
def tensors(draw, shape, dtype, scales=SCALES, poison_rate: int = 6, positive: bool = False):
    """A tensor of `shape` and `dtype`: normal values times a drawn scale, with (1 in
    `poison_rate`) one entry set to NaN, inf or -inf. `positive`: absolute values (masks, distances)."""
    shape = tuple(shape)
    values = torch.randn(
        shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))), dtype=torch.float64
    ) * draw(st.sampled_from(scales))
    if positive:
        values = values.abs()
    numel = math.prod(shape)
    if numel and draw(st.integers(0, poison_rate - 1)) == 0:
        values.view(-1)[draw(st.integers(0, numel - 1))] = draw(st.sampled_from(POISONS))
    return values.to(dtype)


@st.composite
def labels(draw, length: int, num_ids: int = 3):
    return torch.tensor(
        draw(st.lists(st.integers(0, num_ids - 1), min_size=length, max_size=length)), dtype=torch.int64
    )


def is_tame(*ts: torch.Tensor) -> bool:
    """Finite, within TAME_SCALE, and in a dtype that holds them: input every op must accept."""
    return all(bool(torch.isfinite(t).all()) and (t.numel() == 0 or float(t.abs().max()) <= TAME_SCALE) for t in ts)


def outcome(call):
    """The call's result, or None when it raised a ValueError; any other exception propagates."""
    try:
        return call()
    except ValueError:
        return None


def assert_close(got: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, magnitude: float = 1.0):
    """got (any dtype) against a float64 truth, to `dtype`'s accuracy times `magnitude` (the scale of
    the values whose rounding the result inherits)."""
    assert got.shape == truth.shape, (got.shape, truth.shape)
    got = got.double()
    assert bool(torch.isfinite(got).all()), "a result with NaN / inf instead of a ValueError"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, truth, rtol=tol, atol=tol * max(magnitude, 1.0))
