"""Checks of the models' constructor options, one helper per kind of option: each raises a ValueError
that names the model, the option and the range it must lie in, so a bad option is refused before a
model allocates anything (the engine reports it as one line naming model.options) rather than
crashing later in a forward pass or training silently on nonsense."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

from dpm_ops.ops._checks import Bounds, check_number


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(
    model: str,
    name: str,
    value,
    low: int,
    high: Optional[int] = None,
    *,
    why: str = "",
    holds: Callable[[int], bool] = lambda _: True,
) -> int:
    """An integer (not a bool) in [low, high] (no upper bound when high is None) for which `holds` is
    true; `why` completes the message (what `holds` asks, or why the range)."""
    bounds = Bounds(low, high)
    if not (_is_int(value) and value in bounds and holds(value)):
        raise ValueError(f"{model}: {name} must be an integer {bounds.describe()}{why}, got {value!r}")
    return int(value)


def check_real(
    model: str,
    name: str,
    value,
    low: float,
    high: Optional[float] = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> float:
    """A finite real number (ops' check_number: not a bool, not NaN or inf) in the range."""
    try:
        number = check_number(model, name, value)
    except ValueError:
        number = math.nan  # fails the range test below: one message, with the range, for every bad value
    bounds = Bounds(low, high, low_open, high_open)
    if number not in bounds:
        raise ValueError(f"{model}: {name} must be a finite number {bounds.describe()}{why}, got {value!r}")
    return number


def check_int_list(
    model: str,
    name: str,
    value,
    low: int,
    high: Optional[int] = None,
    *,
    length: Optional[int] = None,
    distinct: bool = False,
    why: str = "",
) -> tuple[int, ...]:
    """A non-empty list or tuple of integers in [low, high]: exactly `length` of them when given,
    no repeats when `distinct`."""
    bounds = Bounds(low, high)
    ok = (
        isinstance(value, (list, tuple))
        and (len(value) == length if length is not None else len(value) > 0)
        and all(_is_int(v) and v in bounds for v in value)
        and (not distinct or len(set(value)) == len(value))
    )
    if not ok:
        count = f"{length}" if length is not None else "a non-empty list of"
        kind = "distinct integers" if distinct else "integers"
        raise ValueError(f"{model}: {name} must be {count} {kind} {bounds.describe()}{why}, got {value!r}")
    return tuple(int(v) for v in value)


def check_choice(model: str, name: str, value, choices: Sequence, why: str = "") -> None:
    if isinstance(value, bool) or value not in choices:  # True == 1: a flag is no stride
        wanted = repr(choices[0]) if len(choices) == 1 else f"one of {', '.join(map(repr, choices))}"
        raise ValueError(f"{model}: {name} must be {wanted}{why}, got {value!r}")


def check_flag(model: str, name: str, value) -> None:
    """A bool: a string such as "false" would otherwise read as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{model}: {name} must be True or False, got {value!r}")
