"""Fused batch-hard soft-margin triplet (dpm_ops.ops.batch_hard_triplet): every backend against the
reference loss (dpm_ops.losses.batch_hard_soft_margin_triplet(..., backend="reference")), value and gradient."""

import pytest
import torch

from conftest import backend_params, device_for, op_for
from dpm_ops.losses import SoftMarginTripletLoss, batch_hard_soft_margin_triplet
from dpm_ops.ops import batch_hard_triplet

KERNEL_BACKENDS = backend_params("cpp", "cuda", "triton")

# (B, C, identities): P x K batches, singletons, one identity (no negatives), all distinct.
CASES = [(1, 3, 1), (2, 5, 2), (8, 12, 4), (6, 5, 1), (5, 4, 5), (33, 70, 7), (64, 768, 16)]


def make_inputs(B, C, ids, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, C, generator=gen, dtype=dtype)
    labels = torch.randint(0, ids, (B,), generator=gen)
    return features.to(device), labels.to(device)


def tolerances(dtype):
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}


def check_against_reference(backend, features, labels):
    # fp32 is checked against the fp64 reference: when an anchor is its own hardest positive and its
    # rounded self-distance escapes the 1e-12 clamp, the fp32 reference's gradient is cancellation
    # noise divided by a ~1e-3 distance; the kernels give that pair its exact gradient, 0.
    x = features.detach().requires_grad_(True)
    x_ref = features.detach().double().requires_grad_(True)
    expected = batch_hard_soft_margin_triplet(x_ref, labels, backend="reference")
    (want,) = torch.autograd.grad(expected, x_ref)
    value = batch_hard_triplet(x, labels, backend=backend)
    (got,) = torch.autograd.grad(value, x)
    assert value.shape == () and value.dtype == features.dtype
    torch.testing.assert_close(value.double(), expected, **tolerances(features.dtype))
    torch.testing.assert_close(got.double(), want, **tolerances(features.dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(backend, dtype, case):
    check_against_reference(backend, *make_inputs(*case, dtype, device_for(backend), seed=sum(case)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ties_and_duplicates_pick_the_first_index(backend):
    # Duplicated samples make exact distance ties (and zero distances, where the clamp stops the gradient).
    features, _ = make_inputs(4, 6, 1, torch.float64, device_for(backend), seed=3)
    features = torch.cat([features, features])
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1], device=features.device)
    check_against_reference(backend, features, labels)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("pair", ["positive", "negative"])
def test_a_distance_exactly_at_the_clamp_passes_its_gradient(backend, pair):
    # clamp_min(d2, 1e-12) passes the gradient where d2 >= 1e-12: samples 0 and 1 lie at d2 = (1e-6)² =
    # 1e-12 exactly in float64, anchor 1's hardest positive (index 0, first of a tie with its own clamped
    # self-distance) or both anchors' hardest negative.
    features = torch.tensor([[0.0, 0.0], [1e-6, 0.0], [1.0, 0.0], [2.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1] if pair == "positive" else [0, 1, 0, 1])
    check_against_reference(backend, features.to(device_for(backend)), labels.to(device_for(backend)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_margin_takes_softplus_linear_branch(backend):
    features, labels = make_inputs(6, 4, 2, torch.float64, device_for(backend), seed=5)
    check_against_reference(backend, features * 30, labels)  # d_ap - d_an > 20 for some anchors


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_softplus_is_linear_only_above_20(backend):
    # F.softplus's threshold is strict: at d_ap - d_an = 20 exactly (anchor 1: 25.5 - 5.5) the loss is
    # log1p(e^20) = 20 + 2.1e-9 and its slope sigmoid(20) = 1 - 2.1e-9, at 20.5 (anchor 0: 25.5 - 5) the
    # line; both differences are below the general tolerance. Half-integer distances make every row exact.
    features = torch.tensor([[0.0], [25.5], [5.0], [20.0]], dtype=torch.float64, device=device_for(backend))
    labels = torch.tensor([0, 0, 1, 1], device=features.device)
    x = features.clone().requires_grad_(True)
    value = batch_hard_triplet(x, labels, backend=backend)
    expected = torch.nn.functional.softplus(torch.tensor([20.5, 20.0, 10.0, 9.5], dtype=torch.float64)).mean()
    torch.testing.assert_close(value.cpu(), expected, rtol=4e-16, atol=0)
    (grad,) = torch.autograd.grad(value, x)
    reference = features.cpu().requires_grad_(True)
    (want,) = torch.autograd.grad(
        batch_hard_soft_margin_triplet(reference, labels.cpu(), backend="reference"), reference
    )
    torch.testing.assert_close(grad.cpu(), want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_well_separated_batch_keeps_its_tiny_loss(backend):
    # every anchor's d_ap - d_an is about -40: softplus = log1p(e^-40) = 4.2e-18, which log(1 + e^-40)
    # rounds to 0 (1 + 4.2e-18 == 1 in float64); the general tolerance (atol 1e-12) cannot tell
    features = torch.tensor([[0.0], [0.001], [40.0], [40.001]], dtype=torch.float64, device=device_for(backend))
    labels = torch.tensor([0, 0, 1, 1], device=features.device)
    value = batch_hard_triplet(features, labels, backend=backend)
    expected = batch_hard_soft_margin_triplet(features.cpu(), labels.cpu(), backend="reference")
    assert 0 < expected.item() < 1e-17
    torch.testing.assert_close(value.cpu(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_float64(backend):
    features, labels = make_inputs(6, 5, 3, torch.float64, device_for(backend), seed=1)
    x = features.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: batch_hard_triplet(t, labels, backend=backend), (x,), fast_mode=backend == "triton"
    )  # the Triton interpreter is slow


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck(backend, with_grad):
    features, labels = make_inputs(6, 5, 3, torch.float64, device_for(backend), seed=2)
    torch.library.opcheck(
        op_for("batch_hard_triplet", backend), (features.requires_grad_(with_grad), labels, with_grad)
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    features, labels = make_inputs(8, 6, 4, torch.float64, device_for(backend), seed=4)
    x = features.requires_grad_(True)
    compiled = torch.compile(
        lambda t, y: 3.0 * batch_hard_triplet(t * 2, y, backend=backend), fullgraph=True, backend="aot_eager"
    )
    value = compiled(x, labels)
    expected = 3.0 * batch_hard_soft_margin_triplet(x * 2, labels, backend="reference")
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(torch.autograd.grad(value, x)[0], torch.autograd.grad(expected, x)[0])


def test_module_and_function_default_to_the_fused_kernel(monkeypatch):
    import dpm_ops.losses.triplet as triplet

    calls = []
    original = triplet.batch_hard_triplet
    monkeypatch.setattr(triplet, "batch_hard_triplet", lambda *a, **k: calls.append(1) or original(*a, **k))
    features, labels = make_inputs(8, 6, 4, torch.float64, "cpu")
    fused = SoftMarginTripletLoss()(features, labels)
    assert calls == ([1] if triplet.fused_available(features.device) else [])
    torch.testing.assert_close(fused, SoftMarginTripletLoss(backend="reference")(features, labels))
    monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
    calls.clear()
    batch_hard_soft_margin_triplet(features, labels)
    assert calls == []


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_kernel_under_bf16_autocast_keeps_its_gram_in_fp32(backend):
    # The op's Gram GEMM must not be recast to bf16 by autocast (the mining pass reads fp32).
    features, labels = make_inputs(16, 64, 4, torch.float32, device_for(backend), seed=7)
    x = features.requires_grad_(True)
    expected = batch_hard_triplet(x, labels, backend=backend)
    (expected_grad,) = torch.autograd.grad(expected, x)
    with torch.autocast(features.device.type, dtype=torch.bfloat16):
        got = batch_hard_triplet(x, labels, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **tolerances(torch.float32))
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], expected_grad, **tolerances(torch.float32))


def test_fused_triplet_under_bf16_autocast_runs_in_fp32():
    features, labels = make_inputs(8, 16, 4, torch.float32, "cpu", seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = batch_hard_soft_margin_triplet(features.bfloat16(), labels)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(
        fused, batch_hard_soft_margin_triplet(features.bfloat16().float(), labels, backend="reference")
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x, y: (x[0], y), "features must be 2-D"),
        (lambda x, y: (x.half(), y), "float32 or float64"),
        (lambda x, y: (x, y[:-1]), "labels must be 1-D of length"),
        (lambda x, y: (x, y.int()), "labels must be int64"),
        (lambda x, y: (x.tolist(), y), "^batch_hard_triplet: features must be a torch.Tensor, got list$"),
        (lambda x, y: (x, y[None]), r"^batch_hard_triplet: labels must be 1-D of length B = 4, got \(1, 4\)$"),
    ],
)
def test_bad_input_names_the_argument(backend, bad, message):
    features, labels = make_inputs(4, 6, 2, torch.float32, device_for(backend))
    with pytest.raises(ValueError, match=message):
        batch_hard_triplet(*bad(features, labels), backend=backend)
