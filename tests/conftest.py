"""Test setup: Triton kernels run on CPU tensors under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dpm_ops  # noqa: E402  (after TRITON_INTERPRET)


def backend_params(*names):
    """pytest params for backends, each skipped with the reason dpm_ops.backends() gives."""
    available = dpm_ops.backends()
    return [pytest.param(n, marks=pytest.mark.skipif(not available[n][0], reason=available[n][1] or n))
            for n in names]


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def float32_matmul_precision():
    """torch.set_float32_matmul_precision for one test; the previous setting is restored after it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)
