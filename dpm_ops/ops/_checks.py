"""Input checks shared by the ops' Python entry points."""

import torch


def check_finite(op: str, **tensors) -> None:
    """ValueError naming every tensor with a NaN or inf: one device sync for all of them; skipped
    while compiling (a data-dependent branch)."""
    if torch.compiler.is_compiling():
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
    if not bool(finite.all()):
        bad = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
        raise ValueError(f"{op}: {', '.join(bad)} contains non-finite values (NaN or inf)")


KNN_GPU_MAX_K = 256  # the GPU kernels' per-row lists: CUDA's shared memory (csrc/knn/knn_cuda.h), Triton's registers


def check_knn_gpu_k(k: int, kernel: str) -> None:
    """The GPU kernels' cap on k, with the CUDA kernel's message (csrc/knn/knn_cuda.cpp)."""
    if k > KNN_GPU_MAX_K:
        raise ValueError(f"knn: the {kernel} kernel takes k <= {KNN_GPU_MAX_K}, got {k}")
