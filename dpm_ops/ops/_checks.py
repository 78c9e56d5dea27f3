"""Input checks shared by the ops' Python entry points and the evaluation API: each kind of check
lives here once, with one message, so every op and backend reports a bad argument the same way."""

import math
import numbers

import torch


def check_tensors(op: str, **values) -> None:
    """ValueError naming the first argument that is not a torch.Tensor."""
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def check_finite(op: str, **tensors) -> None:
    """ValueError naming every tensor with a NaN or inf: one device sync for all of them; skipped
    while compiling (a data-dependent branch)."""
    if torch.compiler.is_compiling():
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
    if not bool(finite.all()):
        bad = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
        raise ValueError(f"{op}: {', '.join(bad)} contains non-finite values (NaN or inf)")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in: float64 stays float64, the rest (fp32 / fp16 / bf16) is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norm_limit(dtype: torch.dtype) -> float:
    """The largest row norm the ops take in `dtype`'s compute type: sqrt(max) / 2, so that squared
    norms, Gram entries and squared distances (|x|^2 + |y|^2 + 2|x.y| <= 4 max |x|^2) stay finite.
    Beyond it finite input would overflow into inf, or into 0 after a normalisation."""
    return math.sqrt(torch.finfo(compute_dtype(dtype)).max) / 2


def check_finite_rows(op: str, arithmetic: torch.dtype | None = None, **tensors) -> None:
    """check_finite, and also a ValueError for a tensor whose rows (last dimension) are too large in
    norm for its compute type (row_norm_limit): the condition under which the GEMM-based kernels
    give the exact answer. One reduction per tensor (no temporary of the tensor's size) and one
    device sync for all; the exact finiteness scan runs only when a tensor fails. Skipped while
    compiling. `arithmetic`: the dtype the caller computes in when it is not the tensors' compute
    dtype (float32 for the re-ranking pipeline, as the reference). The C++ CPU masked cosine applies the same rule inside its first pass
    (csrc/masked_cosine/masked_cosine_cpu_kernels.h), with the same messages."""
    if torch.compiler.is_compiling():
        return
    tensors = {name: t for name, t in tensors.items() if t.numel() > 0}
    if not tensors:
        return
    largest = torch.stack([torch.linalg.vector_norm(t, dim=-1, dtype=compute_dtype(t.dtype)).amax().double()
                           for t in tensors.values()])
    arithmetic_of = {name: arithmetic or compute_dtype(t.dtype) for name, t in tensors.items()}
    limits = torch.tensor([row_norm_limit(arithmetic_of[name]) for name in tensors], dtype=torch.float64,
                          device=largest.device)
    ok = largest <= limits  # False for NaN
    if bool(ok.all()):
        return
    failed = {name: t for (name, t), good in zip(tensors.items(), ok.tolist()) if not good}
    check_finite(op, **failed)
    name = next(iter(failed))
    dtype = arithmetic_of[name]
    raise ValueError(f"{op}: {name} is too large in magnitude: row norms must stay below {row_norm_limit(dtype):.3g} "
                     f"in {str(dtype).removeprefix('torch.')} arithmetic")


def check_number(op: str, name: str, value, positive: bool = False) -> float:
    """A finite real number (not a bool; > 0 when `positive`), as a float; else a ValueError naming it."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (positive and not value > 0)):
        raise ValueError(f"{op}: {name} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


KNN_GPU_MAX_K = 256  # the GPU kernels' per-row lists: CUDA's shared memory (csrc/knn/knn_cuda.h), Triton's registers


def check_knn_gpu_k(k: int, kernel: str) -> None:
    """The GPU kernels' cap on k, with the CUDA kernel's message (csrc/knn/knn_cuda.cpp)."""
    if k > KNN_GPU_MAX_K:
        raise ValueError(f"knn: the {kernel} kernel takes k <= {KNN_GPU_MAX_K}, got {k}")
