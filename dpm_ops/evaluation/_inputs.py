"""Argument checks and numpy/torch conversion shared by the evaluation API.

Every public function accepts numpy arrays or torch tensors (CPU or CUDA) and reports a bad
argument with a ValueError that names it.
"""

import numbers
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
        if tensor.layout != torch.strided:  # torch's errors from deep inside named no argument
            raise ValueError(f"{name} must be a dense tensor, got a {tensor.layout} one: pass {name}.to_dense()")
    else:
        try:
            array = np.asarray(value)
        except ValueError as error:  # ragged nested sequences
            raise ValueError(f"{name} must be an array of numbers: {error}") from None
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ValueError(f"{name} must hold numbers, got {type(value).__name__} of {array.dtype}")
        if array.dtype == np.longdouble and np.finfo(np.longdouble).bits > 64:
            raise ValueError(f"{name} is {array.dtype}, which torch cannot hold: pass float64")
        # torch takes neither read-only arrays, negative strides (x[::-1], np.flip) nor a byte order other than
        # the machine's (a '>f4' array from a big-endian file): a copy
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        elif not array.flags.writeable or any(stride < 0 for stride in array.strides):
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
    if tensor.element_size() == 1:  # torch computes nothing in them (no promotion, no kernels)
        raise ValueError(f"{name} is {tensor.dtype}, which is not computed in: cast it to float16 or float32")
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


# k1 and k2 reach the kernels as int64 (k1 + 1 computed there); past twice the number of items a
# larger k changes nothing, so the bound costs no result and keeps a huge int a ValueError.
MAX_K = 2**62


def check_k(name: str, value, low: int) -> int:
    # The cap as a `holds` test: the message keeps its start, "k1 must be an integer >= 1", which
    # dpm_ops.compat passes on to its callers as it is.
    return check_count(name, value, low, holds=lambda k: k <= MAX_K, why=f" and <= {MAX_K}")


# The re-ranking methods of the engine and the command line (`rerank=`): k-reciprocal (this module) and GNN
# re-ranking (gnn_rerank.py), each with its reference's default k1, k2.
RERANK_METHODS = ("kreciprocal", "gnn")
RERANK_DEFAULTS = {"kreciprocal": (20, 6), "gnn": (26, 7)}


def check_rerank(rerank, k1=None, k2=None, lambda_value=0.3):
    """(method or None, k1, k2, lambda_value) of the engine's re-ranking arguments: ``rerank`` False (none),
    True ("kreciprocal") or a name of RERANK_METHODS; k1 / k2 None: that method's defaults (values given
    are checked with or without re-ranking)."""
    method = "kreciprocal" if rerank is True else rerank
    if method is not False and method not in RERANK_METHODS:
        raise ValueError(f"rerank must be a bool or one of {RERANK_METHODS}, got {rerank!r}")
    default_k1, default_k2 = RERANK_DEFAULTS[method or "kreciprocal"]
    k1, k2, lambda_value = check_rerank_parameters(
        default_k1 if k1 is None else k1, default_k2 if k2 is None else k2, lambda_value
    )
    return method or None, k1, k2, lambda_value


def check_rerank_parameters(k1, k2, lambda_value):
    k1 = check_k("k1", k1, 1)
    k2 = check_k("k2", k2, 1)
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, numbers.Real) or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    return k1, k2, float(lambda_value)
