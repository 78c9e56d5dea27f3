"""maskreid_ranking_loss: each backend against the eager reference, forward + backward, in the same run.

Shape: MaskReID's training batch (maskreid.md §5), one identity with 10 images + 54 singletons,
256-d L2-normalised descriptors, for Eq. 5 (pos_mode "hardest"), Eq. 5 over every positive ("all_eq5")
and Eq. 4 ("eq4").
Targets, as ratios to eager: CPU C++ >= 2x ("hardest", "eq4") and >= 4x ("all_eq5"); on a GPU, CUDA >= 2x and
Triton >= 1.5x (both are launch-bound at this size: eager runs ~25 kernels, CUDA 6, Triton 1 + 5 small).
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, GPU, IMPLS, KERNELS, speedup
from dpm_ops.ops import maskreid_ranking_loss

BATCH, DIM = 64, 256
POS_MODES = ("hardest", "all_eq5", "eq4")
CPU_TARGETS = {"hardest": 2.0, "all_eq5": 4.0, "eq4": 2.0}
GPU_TARGETS = {"cuda": 2.0, "triton": 1.5}


def inputs():
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(BATCH, DIM, generator=gen), dim=1).to(DEVICE).requires_grad_(True)
    labels = torch.tensor([0] * 10 + list(range(1, BATCH - 9)), device=DEVICE)
    return x, labels


def group_name(pos_mode):
    return f"maskreid_ranking_loss fwd+bwd {BATCH}x{DIM} pos_mode={pos_mode} {DEVICE}"


@pytest.mark.parametrize("pos_mode", POS_MODES)
@pytest.mark.parametrize("backend", IMPLS)
def bench_forward_backward(timed, backend, pos_mode):
    x, labels = inputs()

    def step():
        loss = maskreid_ranking_loss(x, labels, pos_mode=pos_mode, backend=backend)
        torch.autograd.grad(loss, x)

    timed(
        step,
        group=group_name(pos_mode),
        name=backend,
        device=DEVICE,
        rounds=5,
        iterations=20,
        shape=(BATCH, DIM),
        pos_mode=pos_mode,
        backend=backend,
    )


def _ratio(pos_mode, backend):
    return speedup(group_name(pos_mode), backend)


@pytest.mark.skipif(GPU, reason="CPU targets")
@pytest.mark.parametrize("pos_mode", POS_MODES)
def bench_cpu_targets(pos_mode):
    ratio = _ratio(pos_mode, "cpp")
    print(f"\nC++ CPU ranking loss fwd+bwd ({pos_mode}): {ratio:.2f}x eager")
    assert ratio >= CPU_TARGETS[pos_mode], f"C++ is {ratio:.2f}x eager, target >= {CPU_TARGETS[pos_mode]}x"


@pytest.mark.skipif(not GPU, reason="GPU targets")
@pytest.mark.parametrize("pos_mode", POS_MODES)
@pytest.mark.parametrize("backend", KERNELS)
def bench_gpu_targets(backend, pos_mode):
    ratio = _ratio(pos_mode, backend)
    print(f"\n{backend} ranking loss fwd+bwd ({pos_mode}): {ratio:.2f}x eager")
    assert ratio >= GPU_TARGETS[backend], f"{backend} is {ratio:.2f}x eager, target >= {GPU_TARGETS[backend]}x"
