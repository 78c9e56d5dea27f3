"""Which implementation of an op runs: "reference" | "cpp" | "cuda" | "triton".

Default: CUDA tensors go to the CUDA kernel (or Triton when the extension has no CUDA), CPU tensors
to the C++ kernel (or the reference when the extension is missing). `backend=` on an op, or the
environment variable DPM_OPS_BACKEND, forces one; a forced backend that cannot run raises.
``with forced_backend(name):`` forces one for every op the thread calls inside (e.g. the plain-torch
reference while a model is exported to ONNX, where the fused ops have no ONNX translation).
"""

import contextlib
import importlib.util
import os
import threading

import torch

from ._extension import load_extension

BACKENDS = ("reference", "cpp", "cuda", "triton")
ENV_VAR = "DPM_OPS_BACKEND"


# Loaded once at import (not lazily): torch.compile then reads plain module state, never imports.
_EXTENSION = load_extension()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _availability() -> dict:
    module, missing = _EXTENSION
    cuda_gpu = torch.cuda.is_available()
    has_triton = importlib.util.find_spec("triton") is not None
    report = {"reference": (True, "")}
    report["cpp"] = (module is not None, missing)
    if module is None:
        report["cuda"] = (False, missing)
    elif not module.with_cuda:
        report["cuda"] = (False, "the extension was built without CUDA (CPU torch or no CUDA toolkit)")
    else:
        report["cuda"] = (cuda_gpu, "" if cuda_gpu else "no CUDA GPU is visible")
    if not has_triton:
        report["triton"] = (False, "triton is not installed (pip install triton)")
    else:
        ok = cuda_gpu or triton_interpreted()
        report["triton"] = (ok, "" if ok else "no CUDA GPU and TRITON_INTERPRET is not 1")
    return report


_AVAILABILITY = _availability()


def backends() -> dict:
    """{name: (available, why not)} for this process, e.g. {"cuda": (False, "no CUDA GPU is visible")}."""
    return dict(_AVAILABILITY)


# Set by forced_backend(), per thread as torch's own modes (no_grad, autocast): a block in one thread (an ONNX
# export in a serving process) must not switch the ops other threads run, nor, overlapping with a block in
# another thread, restore that one's backend. torch.compile guards on the attribute read by getattr (a subclass's
# class attribute went unguarded: compiled code kept running the backend it was compiled with).
_FORCED = threading.local()


@contextlib.contextmanager
def forced_backend(backend: str):
    """Within the block, ops called without ``backend=`` in this thread run ``backend`` (it overrides
    DPM_OPS_BACKEND); other threads are not affected."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    previous, _FORCED.backend = _forced(), backend
    try:
        yield
    finally:
        _FORCED.backend = previous


def _forced():
    """This thread's forced_backend, or None."""
    return getattr(_FORCED, "backend", None)


def requested(backend=None):
    """The backend asked for: `backend`, else forced_backend's, else DPM_OPS_BACKEND's; None for the default."""
    return backend or _forced() or os.environ.get(ENV_VAR) or None


def resolve(backend, device: torch.device) -> str:
    """The backend to run for tensors on `device`."""
    name = requested(backend)
    if name is None:
        available = _AVAILABILITY
        if device.type == "cuda":
            for default in ("cuda", "triton", "reference"):
                if available[default][0]:
                    return default
        return "cpp" if available["cpp"][0] else "reference"
    if backend or _forced():
        return _checked(name, device)
    try:
        return _checked(name, device)
    except (ValueError, RuntimeError) as error:  # name the variable: nothing in the failing call set it
        raise type(error)(f"environment variable {ENV_VAR}={name!r}: {error}") from None


def _checked(backend: str, device: torch.device) -> str:
    """`backend`, if it can run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ok, why = _AVAILABILITY[backend]
    if not ok:
        raise RuntimeError(f"dpm_ops backend {backend!r} is not available: {why}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend 'triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on {device}"
        )
    return backend
