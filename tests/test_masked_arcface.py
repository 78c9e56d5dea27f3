"""Fused masked ArcFace cross-entropy (dpm_ops.ops.masked_arcface_ce): every backend against the
reference loss (dpm_ops.losses.masked_arcface_cross_entropy(..., backend="reference")), value and gradients."""

import functools
import math

import numpy as np
import pytest
import torch

from conftest import backend_params, device_for, fp32_tolerances, op_for, record_kernels, record_launches
from dpm_ops.losses import DPMLoss, MaskedArcFaceLoss, masked_arcface_cross_entropy
from dpm_ops.ops import masked_arcface_ce
from test_models_dpm import batch, tiny_dpm

KERNEL_BACKENDS = backend_params("cpp", "cuda", "triton")

# (B, K, C): one sample / class, odd sizes, several tiles and chunks.
SHAPES = [(1, 1, 3), (1, 7, 13), (5, 1, 8), (7, 11, 13), (17, 35, 70), (40, 66, 33)]
OPTIONS = [
    dict(),
    dict(margin=0.3),
    dict(easy_margin=True),
    dict(plain_weight=0.0, masked_weight=1.0),
    dict(plain_weight=0.7, masked_weight=0.2, scale=16.0, clamp_eps=1e-5),
]


def make_inputs(B, K, C, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, C, generator=gen, dtype=dtype)
    mask = torch.rand(B, C, generator=gen, dtype=dtype)
    weight = torch.randn(K, C, generator=gen, dtype=dtype)
    labels = torch.randint(0, K, (B,), generator=gen)
    return [t.to(device) for t in (features, mask, weight, labels)]


def tolerances(dtype):
    return {"atol": 1e-11, "rtol": 1e-9} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}


def check_against_reference(backend, features, mask, weight, labels, tol=None, **options):
    inputs = [t.detach().requires_grad_(True) for t in (features, mask, weight)]
    expected = masked_arcface_cross_entropy(*inputs, labels, backend="reference", **options)
    want = torch.autograd.grad(expected, inputs)
    with pytest.MonkeyPatch.context() as monkeypatch:
        ran = record_kernels(monkeypatch)
        value = masked_arcface_ce(*inputs, labels, backend=backend, **options)
        got = torch.autograd.grad(value, inputs)
    assert ran == [("masked_arcface_ce", backend)]  # the kernel ran, not the reference it is checked against
    assert value.shape == () and value.dtype == features.dtype
    tol = tol or tolerances(features.dtype)
    torch.testing.assert_close(value, expected, **tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, dtype, shape):
    check_against_reference(backend, *make_inputs(*shape, dtype, device_for(backend), seed=sum(shape)))


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("shape", [(1, 7, 13), (40, 66, 33)])
def test_triton_fp32_follows_the_matmul_precision(backend, shape, fp32_matmul_precision, monkeypatch):
    from dpm_ops.triton import masked_arcface as kernels

    launches = record_launches(monkeypatch, kernels, "_arcface_tile_kernel")
    check_against_reference(
        backend,
        *make_inputs(*shape, torch.float32, device_for(backend), seed=3),
        tol=fp32_tolerances(fp32_matmul_precision),
    )
    assert len(launches) >= 2  # the forward tiles and the gradients' recomputed tiles
    want = "ieee" if fp32_matmul_precision == "highest" else "tf32"
    assert {launch["PRECISION"] for launch in launches} == {want}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_options_match_reference(backend, options):
    check_against_reference(backend, *make_inputs(9, 13, 10, torch.float64, device_for(backend), seed=4), **options)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("easy_margin", [False, True])
def test_margin_branches_and_clamp(backend, easy_margin):
    # Targets at cos = 1 (the clamp inside the sqrt), cos = -1 and cos ≈ -0.5 (past θ = π − m: the linear
    # fallback), a zero mask row (the eps branch of the masked cosine) and a zero feature.
    device = device_for(backend)
    features, mask, weight, labels = make_inputs(6, 5, 8, torch.float64, device, seed=2)
    mask[:3] = 1.0
    features[0] = weight[labels[0]]
    features[1] = -weight[labels[1]]
    other = weight[(labels[2] + 1) % 5]
    features[2] = -weight[labels[2]] + 0.2 * other
    mask[3] = 0.0
    features[4] = 0.0
    check_against_reference(backend, features, mask, weight, labels, easy_margin=easy_margin)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("clamp_eps", [0.0, 1e-7])
def test_sqrt_at_cos_plus_minus_one(backend, easy_margin, clamp_eps):
    # clamp_eps=0 (the official unclamped sqrt) with targets at cos = 1 and -1 exactly: sin = 0, where
    # sqrt's slope is infinite. Both take it as flat; the reference used to give NaN gradients.
    # clamp_eps > 0: cos is clamped to [-1 + eps, 1 - eps] first, sin = sqrt(2 eps - eps^2) there.
    device = device_for(backend)
    features, mask, weight, labels = make_inputs(4, 3, 5, torch.float64, device, seed=6)
    weight[0] = torch.tensor([3.0, 0, 0, 0, 0])
    labels[:2] = 0
    mask[:2] = 1.0
    features[0] = torch.tensor([2.0, 0, 0, 0, 0])
    features[1] = torch.tensor([-0.5, 0, 0, 0, 0])
    check_against_reference(backend, features, mask, weight, labels, easy_margin=easy_margin, clamp_eps=clamp_eps)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    features, mask, weight, labels = make_inputs(12, 9, 16, torch.float32, device_for(backend), seed=5)
    check_against_reference(
        backend, features.t().contiguous().t(), torch.cat([mask, mask], 1)[:, ::2], weight.t().contiguous().t(), labels
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_training_shape(backend):
    if backend == "triton" and device_for(backend).type == "cpu":
        pytest.skip("the Triton interpreter is slow; the training shape runs on GPU only")
    check_against_reference(backend, *make_inputs(64, 702, 768, torch.float32, device_for(backend)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_float64(backend, monkeypatch):
    features, mask, weight, labels = make_inputs(4, 5, 6, torch.float64, device_for(backend), seed=1)
    inputs = [t.requires_grad_(True) for t in (features, mask, weight)]
    ran = record_kernels(monkeypatch)
    # fast_mode (random projections): the Triton interpreter costs ~0.1 s per call on the CPU.
    assert torch.autograd.gradcheck(
        lambda f, m, w: masked_arcface_ce(f, m, w, labels, backend=backend), inputs, fast_mode=backend == "triton"
    )
    assert ran and {b for _, b in ran} == {backend}  # the kernel, not the reference, was checked


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("with_grad", [True, False])
def test_opcheck(backend, with_grad):
    features, mask, weight, labels = make_inputs(5, 7, 6, torch.float64, device_for(backend), seed=3)
    args = (
        *[t.requires_grad_(with_grad) for t in (features, mask, weight)],
        labels,
        30.0,
        0.5,
        False,
        1e-7,
        0.5,
        0.5,
        with_grad,
    )
    torch.library.opcheck(op_for("masked_arcface_ce", backend), args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_only_when_autograd_needs_them(backend):
    features, mask, weight, labels = make_inputs(5, 7, 6, torch.float64, device_for(backend), seed=3)
    expected = masked_arcface_cross_entropy(features, mask, weight, labels, backend="reference")
    scalars = (30.0, 0.5, False, 1e-7, 0.5, 0.5)
    loss, *grads = op_for("masked_arcface_ce", backend)(features, mask, weight, labels, *scalars, False)
    torch.testing.assert_close(loss, expected)
    assert all(g.numel() == 0 for g in grads)
    loss, *grads = op_for("masked_arcface_ce", backend)(features, mask, weight, labels, *scalars, True)
    torch.testing.assert_close(loss, expected)
    assert [g.shape for g in grads] == [features.shape, mask.shape, weight.shape]
    with torch.no_grad():  # the public function asks for none under no_grad
        torch.testing.assert_close(
            masked_arcface_ce(features.requires_grad_(True), mask, weight, labels, backend=backend), expected
        )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    features, mask, weight, labels = make_inputs(6, 8, 10, torch.float64, device_for(backend), seed=6)
    inputs = [t.requires_grad_(True) for t in (features, mask, weight)]

    def loss(f, m, w, y):
        return 2.0 * masked_arcface_ce(f * 1.5, m, w, y, margin=0.3, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(*inputs, labels)
    expected = 2.0 * masked_arcface_cross_entropy(
        inputs[0] * 1.5, inputs[1], inputs[2], labels, margin=0.3, backend="reference"
    )
    torch.testing.assert_close(value, expected)
    for got, want in zip(torch.autograd.grad(value, inputs), torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(got, want)


def test_loss_function_and_module_default_to_the_fused_kernel(monkeypatch):
    import dpm_ops.losses.arcface as arcface

    calls = []
    original = arcface.masked_arcface_ce
    monkeypatch.setattr(arcface, "masked_arcface_ce", lambda *a, **k: calls.append(1) or original(*a, **k))
    features, mask, weight, labels = make_inputs(4, 6, 8, torch.float64, "cpu")
    fused = MaskedArcFaceLoss()(features, mask, weight, labels)
    assert calls == ([1] if arcface.fused_available(features.device) else [])
    reference = MaskedArcFaceLoss(backend="reference")(features, mask, weight, labels)
    assert len(calls) <= 1
    torch.testing.assert_close(fused, reference)
    # Forcing the reference backend (or a missing extension) falls back to the reference path.
    monkeypatch.setenv("DPM_OPS_BACKEND", "reference")
    calls.clear()
    torch.testing.assert_close(masked_arcface_cross_entropy(features, mask, weight, labels), reference)
    assert calls == []


def test_fused_loss_under_bf16_autocast_runs_in_fp32():
    features, mask, weight, labels = make_inputs(6, 9, 16, torch.float32, "cpu", seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = masked_arcface_cross_entropy(features.bfloat16(), mask.bfloat16(), weight, labels)
    reference = masked_arcface_cross_entropy(
        features.bfloat16().float(), mask.bfloat16().float(), weight, labels, backend="reference"
    )
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_kernel_under_bf16_autocast_keeps_its_gemms_in_fp32(backend):
    # The op's inner GEMMs must not be recast to bf16 by autocast (its row passes read fp32).
    device = device_for(backend)
    inputs = make_inputs(12, 40, 64, torch.float32, device, seed=9)
    features, mask, weight = (t.requires_grad_(True) for t in inputs[:3])
    expected = masked_arcface_ce(features, mask, weight, inputs[3], backend=backend)
    expected_grads = torch.autograd.grad(expected, (features, mask, weight))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = masked_arcface_ce(features, mask, weight, inputs[3], backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **tolerances(torch.float32))
    for g, e in zip(torch.autograd.grad(got, (features, mask, weight)), expected_grads):
        torch.testing.assert_close(g, e, **tolerances(torch.float32))


def test_dpm_loss_on_loss_inputs_equals_the_logits_path():
    # The same DPM, once returning logits (margin applied by the model) and once the fused loss's inputs.
    model = tiny_dpm()
    torch.nn.init.normal_(model.mask_generator.attfc.weight, std=0.5)
    images, cams, labels = batch(4)
    results = []
    for loss_inputs in (False, True):
        model.loss_inputs = loss_inputs
        model.zero_grad()
        torch.manual_seed(7)  # the same drop-path draws
        output = model(images, cam_label=cams, labels=labels)
        loss = DPMLoss()(output, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == fused_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert set(DPMLoss().terms(output, labels)) == {"id", "hem", "triplet"}


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
@pytest.mark.parametrize(
    "bad, message",
    [
        # named as masked_arcface_ce names them (these said "masked_cosine: x" / "protos")
        (lambda f, m, w, y: (f[0], m, w, y), "masked_arcface_cross_entropy: features must be 2-D"),
        (lambda f, m, w, y: (f, m[:, :-1], w, y), "mask must have the shape"),
        (lambda f, m, w, y: (f, m, w[:, :-1], y), "weight must have C = 6 columns like features"),
        (lambda f, m, w, y: (f, m, w[:0], y), "at least one class"),
        (lambda f, m, w, y: (f, m, w, y[:-1]), "labels must be 1-D of length"),
        (lambda f, m, w, y: (f, m, w, y.int()), "labels must be int64"),
        (
            lambda f, m, w, y: (f, m, w, y.tolist()),
            "^masked_arcface_cross_entropy: labels must be a torch.Tensor, got list$",
        ),
        (lambda f, m, w, y: (f, m, w, y + 100), r"labels must lie in \[0, K = 7\)"),
        (lambda f, m, w, y: (f, m, w, y - 100), r"labels must lie in \[0, K = 7\)"),
        (lambda f, m, w, y: (f.half(), m.half(), w.half(), y), "float32 or float64"),
        (
            lambda f, m, w, y: (f.index_fill(0, torch.tensor([1], device=f.device), float("nan")), m, w, y),
            "features contains non-finite",
        ),
        (
            lambda f, m, w, y: (f, m, w.index_fill(1, torch.tensor([2], device=w.device), float("inf")), y),
            "weight contains non-finite",
        ),
    ],
)
def test_bad_input_names_the_argument(backend, bad, message):
    features, mask, weight, labels = make_inputs(4, 7, 6, torch.float32, device_for(backend))
    with pytest.raises(ValueError, match=message):
        masked_arcface_ce(*bad(features, mask, weight, labels), backend=backend)


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
@pytest.mark.parametrize(
    "options, message",
    [
        # Before: accepted; scale <= 0 flips or flattens the logits, masked_weight=-5 gave a negative loss.
        (dict(scale=-30.0), r"scale must be a finite number in \(0, 1e\+06\], got -30\.0$"),
        (dict(scale=0), r"scale must be a finite number in \(0, 1e\+06\], got 0$"),
        (dict(masked_weight=-5.0), r"masked_weight must be a finite number in \[0, 1e\+06\], got -5\.0$"),
        (dict(plain_weight=-1e-3), r"plain_weight must be a finite number in \[0, 1e\+06\], got -0\.001$"),
        (dict(margin=float("inf")), r"margin must be a finite number, got inf$"),
        # Before: "no" and 1 read as True.
        (dict(easy_margin="no"), r"easy_margin must be True or False, got 'no'$"),
        (dict(easy_margin=1), r"easy_margin must be True or False, got 1$"),
        (dict(easy_margin=None), r"easy_margin must be True or False, got None$"),
    ],
)
def test_bad_options_name_the_argument(backend, options, message):
    inputs = make_inputs(4, 7, 6, torch.float32, device_for(backend))
    with pytest.raises(ValueError, match=f"^masked_arcface_cross_entropy: {message}"):
        masked_arcface_ce(*inputs, **options, backend=backend)
    if backend in ("reference", "cpp"):  # the loss function passes them through, on its reference path too
        for loss_backend in (None, "reference"):
            with pytest.raises(ValueError, match=f"^masked_arcface_cross_entropy: {message}"):
                masked_arcface_cross_entropy(*inputs, **options, backend=loss_backend)


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
def test_options_at_their_edges(backend):
    """A negative margin (a research use), zero branch weights and a numpy bool are taken."""
    inputs = make_inputs(4, 7, 6, torch.float64, device_for(backend))
    for options in (dict(margin=-0.2), dict(plain_weight=0.0, masked_weight=0.0), dict(scale=1e-3)):
        value = masked_arcface_ce(*inputs, **options, backend=backend)
        expected = masked_arcface_cross_entropy(*inputs, **options, backend="reference")
        torch.testing.assert_close(value, expected)
    torch.testing.assert_close(
        masked_arcface_ce(*inputs, easy_margin=np.bool_(True), backend=backend),
        masked_arcface_ce(*inputs, easy_margin=True, backend=backend),
    )


@pytest.mark.parametrize("backend", backend_params("reference", "cpp"))
def test_bad_clamp_eps(backend):
    features, mask, weight, labels = make_inputs(4, 7, 6, torch.float32, "cpu")
    for clamp_eps in (1.5, 1.0, -1e-3):  # [0, 1): at 1 the cosine's clamp range [-1 + eps, 1 - eps] is empty
        with pytest.raises(ValueError, match="clamp_eps must lie in"):
            masked_arcface_ce(features, mask, weight, labels, clamp_eps=clamp_eps, backend=backend)
    assert math.isfinite(masked_arcface_ce(features, mask, weight, labels, clamp_eps=0.0, backend=backend).item())


def test_reference_backend_is_plain_torch_throughout():
    # backend="reference" ran its masked cosine on the default (C++) backend, whose fused kernels
    # have no second derivative; plain torch has one
    features, mask, weight, labels = make_inputs(3, 4, 5, torch.float64, torch.device("cpu"), seed=3)
    inputs = [t.requires_grad_() for t in (features, mask, weight)]
    assert torch.autograd.gradgradcheck(
        lambda f, m, w: masked_arcface_cross_entropy(f, m, w, labels, backend="reference"), inputs
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_refuse_a_label_out_of_range_also_under_compile(backend):
    """The label range is checked by every kernel, so under torch.compile (which skips the Python entry point's
    data-dependent checks) too. Before, the CUDA kernel's loss was NaN there and the Triton kernel's a finite
    loss with a target logit of 0 (8.39 here)."""
    torch._dynamo.reset()
    device = device_for(backend)
    features, mask, weight = (torch.rand(*shape, device=device) for shape in ((4, 8), (4, 8), (5, 8)))
    labels = torch.tensor([0, 1, 2, 7], device=device)
    compiled = torch.compile(functools.partial(masked_arcface_ce, backend=backend), fullgraph=True, backend="aot_eager")
    for run in (compiled, op_for("masked_arcface_ce", backend)):
        args = () if run is compiled else (30.0, 0.5, False, 1e-7, 0.5, 0.5, False)
        with pytest.raises(ValueError, match=r"masked_arcface_cross_entropy: labels must lie in \[0, K = 5\)"):
            run(features, mask, weight, labels, *args)
