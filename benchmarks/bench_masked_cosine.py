"""masked_cosine: each backend against the eager reference, in the same run.

Targets (issue: foundation), as ratios to eager: CPU C++ >= 2x on forward+backward at the training
shape and never slower on the test-distance shape; on a GPU, CUDA and Triton >= 3x eager and
>= 85% of the roofline.
"""

import pytest
import torch

from benchmarks.conftest import speedup
from dpm_ops.ops import masked_cosine

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TRAIN = (64, 702, 768)  # DPM training logits: batch x identities x channels
TEST = (2210, 17661, 768) if GPU else (2210, 4096, 768)  # Occluded-Duke query x gallery (CPU: a slice)
KERNELS = ("cuda", "triton") if GPU else ("cpp",)
# Dense peak of the arithmetic the kernels use: fp32 FMA for fp32, tensor cores for bf16 (H100 SXM).
H100_PEAK_FLOPS = {torch.float32: 67e12, torch.bfloat16: 989e12}


def inputs(shape, dtype, requires_grad):
    B, K, C = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, generator=gen)
    mask = torch.rand(B, C, generator=gen)
    protos = torch.randn(K, C, generator=gen)
    return [t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (x, mask, protos)]


def forward_flop(shape):
    B, K, C = shape
    return 2 * 2 * B * K * C  # two (B x K x C) products


def group_name(kind, shape, dtype):
    return f"masked_cosine {kind} {'x'.join(map(str, shape))} {str(dtype).split('.')[-1]} {DEVICE}"


ROOFLINE = {}  # (backend, dtype) -> fraction of the peak reached at the test shape

DTYPES = (torch.float32, torch.bfloat16) if GPU else (torch.float32,)
IMPLS = ("reference",) + KERNELS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", IMPLS)
def bench_train_forward_backward(timed, backend, dtype):
    x, mask, protos = inputs(TRAIN, dtype, requires_grad=True)
    grad = torch.randn(TRAIN[0], TRAIN[1], device=DEVICE, dtype=dtype)

    def step():
        out = masked_cosine(x, mask, protos, backend=backend)
        torch.autograd.grad(out, (x, mask, protos), grad)

    timed(step, group=group_name("fwd+bwd", TRAIN, dtype), name=backend, device=DEVICE,
          flop=3 * forward_flop(TRAIN), rounds=15, iterations=5, shape=TRAIN, dtype=str(dtype), backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", IMPLS)
def bench_test_distance_forward(timed, backend, dtype):
    x, mask, protos = inputs(TEST, dtype, requires_grad=False)
    median = timed(lambda: masked_cosine(x, mask, protos, backend=backend),
                   group=group_name("fwd", TEST, dtype), name=backend, device=DEVICE, flop=forward_flop(TEST),
                   rounds=3, iterations=1, shape=TEST, dtype=str(dtype), backend=backend)
    if median is not None and GPU:
        ROOFLINE[(backend, dtype)] = forward_flop(TEST) / median / H100_PEAK_FLOPS[dtype]


def _ratio(kind, shape, dtype, backend):
    group = group_name(kind, shape, dtype)
    return speedup(group, backend)


@pytest.mark.skipif(GPU, reason="CPU targets")
def bench_cpu_targets():
    train = _ratio("fwd+bwd", TRAIN, torch.float32, "cpp")
    test = _ratio("fwd", TEST, torch.float32, "cpp")
    print(f"\nC++ CPU speed-up over eager: fwd+bwd {TRAIN}: {train:.2f}x, fwd {TEST}: {test:.2f}x")
    assert train >= 2.0, f"C++ fwd+bwd at the training shape is {train:.2f}x eager, target >= 2x"
    assert test >= 1.0, f"C++ forward at the test shape is {test:.2f}x eager, target: never slower"


@pytest.mark.skipif(not GPU, reason="GPU targets")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNELS)
def bench_gpu_targets(backend, dtype):
    train = _ratio("fwd+bwd", TRAIN, dtype, backend)
    test = _ratio("fwd", TEST, dtype, backend)
    roofline = ROOFLINE.get((backend, dtype))
    print(f"\n{backend} {dtype}: fwd+bwd {train:.2f}x eager, fwd {test:.2f}x eager, {roofline:.0%} of peak")
    assert train >= 3.0 and test >= 3.0, f"{backend} is {train:.2f}x / {test:.2f}x eager, target >= 3x"
    assert roofline >= 0.85, f"{backend} reaches {roofline:.0%} of the peak at the test shape, target >= 85%"
