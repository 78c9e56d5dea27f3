"""Argument checks and numpy/torch conversion shared by the evaluation API.

Every public function accepts numpy arrays or torch tensors (CPU or CUDA) and reports a bad
argument with a ValueError that names it.
"""

from functools import partial

import numpy as np
import torch

from ..ops._checks import check_finite, check_finite_rows, check_int

_NUMERIC_KINDS = "biuf"  # numpy dtype kinds: bool, signed / unsigned integer, float


def as_tensor(name: str, value, ndim: int, device=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.is_meta:
            raise ValueError(f"{name} is a meta tensor (shape only, no values)")
    else:
        try:
            array = np.asarray(value)
        except ValueError as error:  # ragged nested sequences
            raise ValueError(f"{name} must be an array of numbers: {error}") from None
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"{name} must hold numbers, got {type(value).__name__} of {array.dtype}")
        if array.dtype == np.longdouble and np.finfo(np.longdouble).bits > 64:
            raise ValueError(f"{name} is {array.dtype}, which torch cannot hold: pass float64")
        # torch takes neither read-only arrays nor negative strides (x[::-1], np.flip): a copy
        if not array.flags.writeable or any(stride < 0 for stride in array.strides):
            array = array.copy()
        tensor = torch.from_numpy(array)
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    return tensor if device is None else tensor.to(device)


def as_floats(
    op: str, name: str, value, ndim: int, device=None, vectors: bool = False, arithmetic: torch.dtype | None = None
) -> torch.Tensor:
    """A non-empty floating-point tensor of finite values; `vectors`: its rows are feature vectors,
    whose norms must also stay within what the GEMM-based code can square in its compute dtype, or
    in `arithmetic` (ops._checks.check_finite_rows)."""
    tensor = as_tensor(name, value, ndim, device)
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must hold floating-point values, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    if vectors:
        check_finite_rows(op, arithmetic, **{name: tensor})
    else:
        check_finite(op, **{name: tensor})
    return tensor


# An integer argument of the evaluation API, named without an op prefix as its other messages are:
# check_count(name, value, low, high=None)
check_count = partial(check_int, None)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def to_numpy(result: torch.Tensor) -> np.ndarray:
    """A tensor as a numpy array on the CPU; bfloat16, which numpy lacks, as float32 (exact)."""
    result = result.detach().cpu()
    return (result.float() if result.dtype == torch.bfloat16 else result).numpy()


def like_input(result: torch.Tensor, template):
    """torch in, torch out; anything else (a numpy array, a list, ...) in, numpy out."""
    return result if isinstance(template, torch.Tensor) else to_numpy(result)
