"""Argument checks and numpy/torch conversion shared by the evaluation API.

Every public function accepts numpy arrays or torch tensors (CPU or CUDA) and reports a bad
argument with a ValueError that names it.
"""

import numbers

import numpy as np
import torch


def as_tensor(name: str, value, ndim: int, device=None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        tensor = torch.from_numpy(value) if value.flags.writeable else torch.from_numpy(value.copy())
    elif isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        tensor = torch.as_tensor(np.asarray(value))
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    return tensor if device is None else tensor.to(device)


def as_floats(name: str, value, ndim: int, device=None) -> torch.Tensor:
    tensor = as_tensor(name, value, ndim, device)
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must hold floating-point values, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
    check_finite(name, tensor)
    return tensor


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf")


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; float16 / bfloat16 / float32 are computed in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def like_input(result: torch.Tensor, template):
    """numpy in, numpy out; torch in, torch out."""
    return result.cpu().numpy() if isinstance(template, np.ndarray) else result
