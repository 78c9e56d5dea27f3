"""Input checks shared by the ops' Python entry points and the evaluation API: each kind of check
lives here once, with one message, so every op and backend reports a bad argument the same way."""

import contextlib
import dataclasses
import math
import numbers
import reprlib
from typing import Any, Callable, Optional

import numpy as np
import torch

from .._precision import compute_dtype


class _Quoted(reprlib.Repr):
    """A repr cut short: four items of a container, three levels deep, long strings elided, long integers
    by their length."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxdict = self.maxset = self.maxfrozenset = 4
        self.maxstring = self.maxother = 60

    def repr_int(self, x, level):
        if x.bit_length() <= 320:  # up to ~96 digits
            return repr(x)
        # longer, an integer by its length: str() takes time quadratic in the digits, and refuses more than
        # sys.get_int_max_str_digits() of them (at least 640)
        return f"an integer of {len(str(abs(x))) if x.bit_length() <= 2000 else 'over 600'} digits"


_QUOTED = _Quoted()
QUOTE_CHARS = 100
# The most a loss weight, a logit scale or the camera embedding's coefficient may be: far past any in use (ArcFace's
# scale 30, the SIE's 3, weights of 0.1 to 2) and far below what overflows float32 once multiplied into logits and
# losses (a scale of 1e39 gave a NaN loss, and a train step's NaN in the BatchNorm statistics broke every later call).
MAX_COEFFICIENT = 1e6
# Image sides and padding, in pixels (the models', the transforms'): person crops are ~256 x 128; far past this a
# batch no longer fits in memory (input.padding=100000 was killed by the OOM killer)
MAX_IMAGE_SIDE = 4096


def values_hidden() -> bool:
    """Whether tensor values cannot be read here, so the checks that read them (finiteness, label ranges, norms)
    are skipped: while torch.compile traces (a data-dependent branch), and under torch.func.vmap (batched tensors
    have no storage: the checks' .tolist() was an internal error)."""
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.TransformType.Vmap in functorch_transforms()


def functorch_transforms() -> set:
    """The torch.func transforms active here (torch._C._functorch.TransformType: Vmap, Grad, Jvp, ...)."""
    if torch._C._functorch.peek_interpreter_stack() is None:  # none
        return set()
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}


def first_line(error: BaseException) -> str:
    """An exception's first line (its type's name when it says nothing), for one-line messages."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def quote(value: Any) -> str:
    """``value`` as an error message shows it: its repr, cut to QUOTE_CHARS characters, built in a time bounded
    whatever the value (the whole repr of a config list nested through YAML aliases ran to 358 MB)."""
    text = _QUOTED.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range a number must lie in: a config field's (declared beside it in the schema) or a model
    option's (models/_checks.py)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself excluded: a positive value
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        low, high = _shown(self.low), _shown(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _shown(bound) -> str:
    """A bound in a message: an integer whole (a seed's 2^63 - 1), a float short (pi / 2 as 1.5708)."""
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def check_tensors(op: str, **values) -> None:
    """ValueError naming the first argument that is not a torch.Tensor, or is a meta tensor."""
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    check_not_meta(op, **values)


def check_not_meta(op: str, **tensors) -> None:
    """The value checks read values, which a meta tensor (shape only) has not: a ValueError naming it
    rather than torch's RuntimeError from .item()."""
    for name, t in tensors.items():
        if t.is_meta:
            raise ValueError(f"{op}: {name} is a meta tensor (shape only, no values)")


def check_batch(op: str, name: str, t: torch.Tensor) -> None:
    """A loss is a mean over the batch: an empty one has no value (torch's mean of nothing is NaN)."""
    if t.shape[0] == 0:
        raise ValueError(f"{op}: {name} must hold at least one sample (B >= 1), got shape {tuple(t.shape)}")


def check_from_forward(op: str, name: str, t, shape, dtype, device: torch.device) -> None:
    """A backward op's gradient or saved tensor as its forward gives it (csrc/common/backward_checks.h's
    check for the C++ ops): a direct torch.ops call may pass any, and the kernels read it as the forward's.
    `dtype`: the one the forward gives, or a tuple of the few a backward takes."""
    check_tensors(op, **{name: t})
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have the forward's shape {list(shape)}, got {list(t.shape)}")
    dtypes = dict.fromkeys(dtype if isinstance(dtype, tuple) else (dtype,))
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{op}: {name} must be {expected} as the forward gives it, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} with the forward's inputs, got {t.device}")


def check_loss_grad(op: str, grad) -> None:
    """The gradient of a scalar loss: one value, of any floating dtype and device (it is read as a number)."""
    check_tensors(op, grad=grad)
    if grad.numel() != 1 or not grad.is_floating_point():
        raise ValueError(
            f"{op}: grad must be the loss's gradient, one floating-point value, got {grad.dtype} of shape "
            f"{list(grad.shape)}"
        )


def check_labels(op: str, labels, features: torch.Tensor, of: str = "features") -> None:
    """Class labels of a batch: an int64 tensor of shape (B,) on the device of `features` (named `of`)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"{op}: labels must be 1-D of length B = {features.shape[0]}, got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"{op}: labels must be int64, got {labels.dtype}")
    if labels.device != features.device:
        raise ValueError(f"{op}: labels must be on the {of}' device {features.device}, got {labels.device}")


def check_label_range(op: str, labels: torch.Tensor, num_classes: int) -> None:
    """One sync, skipped while compiling: every label is one of `num_classes` classes (an index into
    (B, K) logits: past them, an IndexError, on CUDA a device-side assert that ends the process)."""
    if values_hidden() or labels.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(labels)).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"{op}: labels must lie in [0, K = {num_classes})")


def check_finite(op: str, **tensors) -> None:
    """ValueError naming every tensor with a NaN or inf: one device sync for all of them; skipped
    while compiling (a data-dependent branch). Each tensor is summed (one vectorised reduction, no
    temporary of its size; NaN and inf reach the sum); only a tensor whose sum is not finite, which
    huge finite values can also cause, is scanned exactly."""
    if values_hidden():
        return
    check_not_meta(op, **tensors)
    sums = torch.stack([t.sum(dtype=compute_dtype(t.dtype)).double() for t in tensors.values()])
    finite_sums = torch.isfinite(sums).tolist()
    if all(finite_sums):
        return
    bad = [name for (name, t), ok in zip(tensors.items(), finite_sums) if not ok and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{op}: {', '.join(bad)} contains non-finite values (NaN or inf)")


def check_nonnegative(op: str, **tensors) -> None:
    """ValueError naming a tensor with a negative value (weights: a negative one has no meaning, and
    the backends' rules for which cells count, weight > 0 or a positive total, differ for it); one
    sync, skipped while compiling."""
    tensors = {name: t for name, t in tensors.items() if t.numel() > 0}
    if values_hidden() or not tensors:
        return
    for (name, t), low in zip(tensors.items(), torch.stack([t.amin() for t in tensors.values()]).tolist()):
        if low < 0:
            raise ValueError(f"{op}: {name} must be >= 0 (weights), got a minimum of {low:g}")


def row_norm_limit(dtype: torch.dtype) -> float:
    """The largest row norm the ops take in `dtype`'s compute type: sqrt(max) / 2, so that squared
    norms, Gram entries and squared distances (|x|^2 + |y|^2 + 2|x.y| <= 4 max |x|^2) stay finite.
    Beyond it finite input would overflow into inf, or into 0 after a normalisation."""
    return math.sqrt(torch.finfo(compute_dtype(dtype)).max) / 2


def row_norm_floor(dtype: torch.dtype) -> float:
    """The least largest value (zero aside) Euclidean distances take in `dtype`'s compute type:
    sqrt(tiny / eps) (3.1e-16 in float32), below which squared norms and dot products fall among the
    subnormals or to 0 and the distances come out as rounding noise (all 0 at 1e-25 in float32)."""
    info = torch.finfo(compute_dtype(dtype))
    return math.sqrt(info.tiny / info.eps)


def too_large_message(op: str, name: str, dtype: torch.dtype, limit: str) -> str:
    return f"{op}: {name} is too large in magnitude: {limit} in {str(dtype).removeprefix('torch.')} arithmetic"


def check_result_finite(op: str, result: torch.Tensor, **inputs) -> None:
    """check_finite of `inputs` done through the result, for ops whose every output is a sum over
    its inputs (NaN and inf reach it) and whose output is small next to them: one sync on the
    output, no pass over the input. A non-finite result names the non-finite input, or, when all
    are finite, the sums overflowed: the input is too large in magnitude."""
    if values_hidden():
        return
    check_not_meta(op, **inputs)
    if bool(torch.isfinite(result).all()):
        return
    check_finite(op, **inputs)
    raise ValueError(too_large_message(op, ", ".join(inputs), compute_dtype(result.dtype), "its sums overflow"))


def check_finite_rows(op: str, arithmetic: torch.dtype | None = None, max_norm: float | None = None, **tensors) -> None:
    """check_finite, and also a ValueError for a tensor whose rows (last dimension) are too large in
    norm for its compute type (row_norm_limit): the condition under which the GEMM-based kernels
    give the exact answer. One reduction per tensor (no temporary of the tensor's size) and one
    device sync for all; the exact finiteness scan runs only when a tensor fails. Skipped while
    compiling. `arithmetic`: the dtype the caller computes in when it is not the tensors' compute
    dtype (float32 for the re-ranking pipeline, as the reference); `max_norm`: a tighter limit the
    op's own arithmetic needs (the ranking loss exponentiates similarities). The C++ CPU masked
    cosine applies the same rule inside its first pass (csrc/masked_cosine/masked_cosine_cpu_kernels.h),
    with the same messages."""
    if values_hidden():
        return
    check_not_meta(op, **tensors)
    tensors = {name: t for name, t in tensors.items() if t.numel() > 0}
    if not tensors:
        return
    largest = torch.stack(
        [torch.linalg.vector_norm(t, dim=-1, dtype=compute_dtype(t.dtype)).amax().double() for t in tensors.values()]
    )
    arithmetic_of = {name: arithmetic or compute_dtype(t.dtype) for name, t in tensors.items()}
    limit_of = {name: min(row_norm_limit(dtype), max_norm or math.inf) for name, dtype in arithmetic_of.items()}
    limits = torch.tensor(list(limit_of.values()), dtype=torch.float64, device=largest.device)
    fits = (largest <= limits).tolist()  # False for NaN
    if all(fits):
        return
    failed = {name: t for (name, t), good in zip(tensors.items(), fits) if not good}
    check_finite(op, **failed)
    name = next(iter(failed))
    raise ValueError(
        too_large_message(op, name, arithmetic_of[name], f"row norms must stay below {limit_of[name]:.3g}")
    )


def check_euclidean_scale(op: str, arithmetic: torch.dtype, **tensors) -> None:
    """A ValueError when the inputs of Euclidean distances are all too small for `arithmetic`: their largest
    |value| below row_norm_floor but not 0, where the squared norms and dot products fall among the subnormals
    and every distance is rounding noise (features scaled by 1e-25 gave all-zero distances and neighbours in
    index order). Inputs of mixed scales are taken: their distances are resolved to the larger one's precision,
    as any float computation of them is. One reduction per tensor; skipped while compiling."""
    tensors = {name: t for name, t in tensors.items() if t.numel() > 0}
    if values_hidden() or not tensors:
        return
    peak = max(float(torch.linalg.vector_norm(t.detach(), ord=math.inf)) for t in tensors.values())
    floor = row_norm_floor(arithmetic)
    if 0 < peak < floor:
        names = " and ".join(tensors) + (" are" if len(tensors) > 1 else " is")
        raise ValueError(
            f"{op}: {names} too small in magnitude for Euclidean distances in "
            f"{str(arithmetic).removeprefix('torch.')} arithmetic: the largest |value| must be 0 or at least "
            f"{floor:.3g} (scale the features)"
        )


def check_number(op: str, name: str, value, positive: bool = False) -> float:
    """A finite real number (not a bool; > 0 when `positive`), as a float; else a ValueError naming it."""
    if (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and -math.inf < value < math.inf  # NaN fails too; math.isfinite takes no SymFloat (torch.compile dynamic)
        and (not positive or value > 0)
    ):
        with contextlib.suppress(OverflowError):  # an int past float's range (10**400) compares below inf
            return float(value)
    raise ValueError(f"{op}: {name} must be a finite number{' > 0' if positive else ''}, got {quote(value)}")


def check_eps(op: str, eps, dtype: torch.dtype, floors_a_norm: bool = False) -> float:
    """A norm's eps for input of `dtype`: an addend of its square, at least the smallest normal number of the
    compute dtype (1.2e-38 in float32, where the kernels compute: a subnormal eps may be flushed to 0, and a
    zero row divided by it, NaN); with ``floors_a_norm`` the norm's floor, at least that number's square root
    (1.1e-19 in float32): a norm below it, computed from its square, underflowed to 0 and took a smaller floor's
    place (cosines of -4e4 at eps 1e-30)."""
    value = check_number(op, "eps", eps, positive=True)
    compute = compute_dtype(dtype)
    least = torch.finfo(compute).tiny
    what = f"the smallest normal {str(compute).removeprefix('torch.')} number"
    if floors_a_norm:
        least, what = math.sqrt(least), f"the square root of {what} (norms are computed from their squares)"
    if value < least:
        raise ValueError(f"{op}: eps must be finite and >= {least:.6g}, {what}, got {eps!r}")
    return value


def check_known_options(owner: str, options, known, error: type = ValueError) -> None:
    """Every keyword of ``options`` one of ``known`` (a callee's own TypeError names no caller, or comes only
    after work): ``error`` (ValueError or a subclass) naming ``owner``, the unknown ones and the known ones."""
    unknown = sorted(name for name in options if name not in known)
    if unknown:
        raise error(f"{owner} takes no option {', '.join(map(repr, unknown))}; its options: {', '.join(known)}")


def check_flag(op: Optional[str], name: str, value) -> bool:
    """A bool (Python's or numpy's), as a Python bool: a string such as "no" would otherwise read as true."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{_owner(op)}{name} must be True or False, got {quote(value)}")
    return bool(value)


def is_integer(value) -> bool:
    """An integer of any integral type (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
    """A finite int or float, numpy's too (not a bool); an int past float's range (10**400) is none."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # float() of an int past float's range
        return False


def _owner(op: Optional[str]) -> str:
    """A message's prefix: the op or class that checks, none for the evaluation API (names alone)."""
    return f"{op}: " if op else ""


def check_int(
    op: Optional[str],
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
    if not (is_integer(value) and value in bounds and holds(value)):
        raise ValueError(f"{_owner(op)}{name} must be an integer {bounds.describe()}{why}, got {quote(value)}")
    return int(value)


def check_int_list(
    op: Optional[str],
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
        and all(is_integer(v) and v in bounds for v in value)
        and (not distinct or len(set(value)) == len(value))
    )
    if not ok:
        count = f"{length}" if length is not None else "a non-empty list of"
        kind = "distinct integers" if distinct else "integers"
        raise ValueError(f"{_owner(op)}{name} must be {count} {kind} {bounds.describe()}{why}, got {quote(value)}")
    return tuple(int(v) for v in value)


def check_real(
    op: Optional[str],
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
        number = check_number(op, name, value)
    except ValueError:
        number = math.nan  # fails the range test below: one message, with the range, for every bad value
    bounds = Bounds(low, high, low_open, high_open)
    if number not in bounds:
        raise ValueError(f"{_owner(op)}{name} must be a finite number {bounds.describe()}{why}, got {quote(value)}")
    return number


KNN_GPU_MAX_K = 256  # the GPU kernels' per-row lists: CUDA's shared memory (csrc/knn/knn_cuda.h), Triton's registers


def check_knn_gpu_k(k: int, kernel: str) -> None:
    """The GPU kernels' cap on k, with the CUDA kernel's message (csrc/knn/knn_cuda.cpp)."""
    if k > KNN_GPU_MAX_K:
        raise ValueError(f"knn: the {kernel} kernel takes k <= {KNN_GPU_MAX_K}, got {k}")
