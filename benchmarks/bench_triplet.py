"""Fused batch-hard soft-margin triplet vs the eager reference loss, forward+backward, same run.

Shape: DPM training, B=64 (16 identities x 4), C=768 pre-BN features. Target (CPU): the C++ kernel
>= 1.5x eager (one Gram GEMM and one mining pass instead of ~12 eager (B, B) ops and their backward);
on a GPU, CUDA and Triton >= 2x eager.
"""

import pytest
import torch

from benchmarks.conftest import DEVICE, GPU, IMPLS, KERNELS, skip_interpreted_triton, speedup
from dpm_ops.losses import batch_hard_soft_margin_triplet
from dpm_ops.ops import batch_hard_triplet

TRAIN = (64, 768, 16)
SMOKE = (8, 24, 4)  # the CI pass (--benchmark-disable)


def inputs(shape):
    B, C, ids = shape
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(B, C, generator=gen).to(DEVICE).requires_grad_(True)
    labels = (torch.arange(B) % ids).to(DEVICE)
    return features, labels


def group_name(shape):
    return f"batch_hard_triplet fwd+bwd {'x'.join(map(str, shape))} {DEVICE}"


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("shape", [TRAIN, SMOKE], ids=["train", "smoke"])
def bench_forward_backward(timed, backend, shape):
    skip_interpreted_triton(backend, smoke=shape == SMOKE)
    features, labels = inputs(shape)

    def step():
        if backend == "reference":
            loss = batch_hard_soft_margin_triplet(features, labels, backend="reference")
        else:
            loss = batch_hard_triplet(features, labels, backend=backend)
        torch.autograd.grad(loss, features)

    timed(step, group=group_name(shape), name=backend, device=DEVICE, rounds=9, shape=shape, backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
def bench_targets(backend):
    group = group_name(TRAIN)
    ratio = speedup(group, backend)
    target = 2.0 if GPU else 1.5
    print(f"\n{backend} batch-hard triplet fwd+bwd {TRAIN}: {ratio:.2f}x eager")
    assert ratio >= target, f"{backend} is {ratio:.2f}x eager at {TRAIN}, target >= {target}x"
