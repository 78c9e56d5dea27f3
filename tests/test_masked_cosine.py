"""masked_cosine / masked_arccos_distance: every backend against the reference (dpm.md §3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params, device_for, fp32_tolerances, needs_gpu, op_for, record_kernels, record_launches
from dpm_ops.ops import masked_arccos_distance, masked_cosine, masked_cosine_reference

KERNEL_BACKENDS = backend_params("cpp", "cuda", "triton")
ALL_BACKENDS = backend_params("reference", "cpp", "cuda", "triton")

# (B, K, C): empty, single, C not a multiple of any block size, several tiles.
SHAPES = [(0, 5, 8), (3, 0, 8), (1, 1, 1), (1, 7, 13), (5, 1, 33), (17, 35, 70), (65, 66, 40)]


def make_inputs(B, K, C, dtype, device, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=gen, dtype=dtype)
    mask = torch.rand(B, C, generator=gen, dtype=dtype)
    protos = torch.randn(K, C, generator=gen, dtype=dtype)
    return [t.to(device).requires_grad_(requires_grad) for t in (x, mask, protos)]


def per_pair_cosine(x, mask, protos, eps=1e-12):
    """The spec's definition taken literally, one (b, k) pair at a time (as the official loop)."""
    out = torch.empty(x.shape[0], protos.shape[0], dtype=x.dtype)
    for b in range(x.shape[0]):
        masked = mask[b] * F.normalize(protos, dim=1, eps=eps)
        out[b] = F.normalize(masked, dim=1, eps=eps) @ F.normalize(x[b], dim=0, eps=eps)
    return out


def tolerances(dtype):
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}


def test_reference_matches_the_per_pair_definition():
    x, mask, protos = make_inputs(6, 9, 21, torch.float64, "cpu")
    torch.testing.assert_close(masked_cosine_reference(x, mask, protos), per_pair_cosine(x, mask, protos))


def test_half_mask_gives_the_plain_cosine():
    # DPM's zero-initialised mask generator outputs sigmoid(0) = 0.5 everywhere: C is the plain cosine.
    x, _, protos = make_inputs(4, 6, 16, torch.float64, "cpu")
    plain = F.normalize(x, dim=1) @ F.normalize(protos, dim=1).t()
    torch.testing.assert_close(masked_cosine(x, torch.full_like(x, 0.5), protos), plain)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(backend, dtype, shape, monkeypatch):
    device = device_for(backend)
    x, mask, protos = make_inputs(*shape, dtype, device, seed=sum(shape), requires_grad=True)
    grad = torch.randn(shape[0], shape[1], dtype=dtype, device=device)
    expected = masked_cosine_reference(x, mask, protos)
    expected_grads = torch.autograd.grad(expected, (x, mask, protos), grad, allow_unused=True)
    ran = record_kernels(monkeypatch)
    out = masked_cosine(x, mask, protos, backend=backend)
    # the backend's kernel ran (the train variant where it keeps den^2), not the reference
    assert ran == [("masked_cosine_train" if backend in ("cpp", "cuda") else "masked_cosine", backend)]
    grads = torch.autograd.grad(out, (x, mask, protos), grad, allow_unused=True)
    assert out.dtype == dtype and out.shape == (shape[0], shape[1])
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, **tolerances(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    x, mask, protos = make_inputs(40, 30, 24, torch.float32, device)
    x_t = x.t().contiguous().t()  # column-major
    mask_s = torch.cat([mask, mask], dim=1)[:, ::2]  # strided
    protos_t = protos.t().contiguous().t()
    expected = masked_cosine_reference(x, mask_s, protos)
    torch.testing.assert_close(
        masked_cosine(x_t, mask_s, protos_t, backend=backend), expected, **tolerances(torch.float32)
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_of_a_sum_arrives_with_stride_zero(backend):
    device = device_for(backend)
    x, mask, protos = make_inputs(5, 7, 9, torch.float64, device, requires_grad=True)
    masked_cosine(x, mask, protos, backend=backend).sum().backward()
    expected = torch.autograd.grad(masked_cosine_reference(x, mask, protos).sum(), (x, mask, protos))
    for got, want in zip((x.grad, mask.grad, protos.grad), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_rows_take_the_eps_branch(backend):
    # A zero feature, a zero prototype and a zero mask row: the clamps of F.normalize decide.
    device = device_for(backend)
    x, mask, protos = make_inputs(4, 5, 12, torch.float64, device)
    x[1] = 0
    protos[2] = 0
    mask[3] = 0
    inputs = [t.requires_grad_() for t in (x, mask, protos)]
    out = masked_cosine(*inputs, backend=backend)
    expected = masked_cosine_reference(*inputs)
    torch.testing.assert_close(out, expected)
    assert torch.all(out[1] == 0) and torch.all(out[:, 2] == 0) and torch.all(out[3] == 0)
    # the zero mask row's den = 0: the clamp is constant there, in the reference too (its square
    # root's infinite derivative made every prototype's gradient NaN)
    upstream = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_float64(backend, monkeypatch):
    device = device_for(backend)
    inputs = make_inputs(3, 4, 6, torch.float64, device, requires_grad=True)
    ran = record_kernels(monkeypatch)
    assert torch.autograd.gradcheck(lambda x, m, p: masked_cosine(x, m, p, backend=backend), inputs)
    assert ran and {b for _, b in ran} == {backend}  # the kernels, not the reference, were checked


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_shape(backend):
    if backend == "triton" and device_for(backend).type == "cpu":
        pytest.skip("the Triton interpreter costs ~0.4 ms per program; large shapes run on GPU only")
    device = device_for(backend)
    x, mask, protos = make_inputs(300, 1000, 768, torch.float32, device)
    torch.testing.assert_close(
        masked_cosine(x, mask, protos, backend=backend),
        masked_cosine_reference(x, mask, protos),
        **tolerances(torch.float32),
    )


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (17, 35, 70), (70, 140, 200)])
def test_reduced_precision(backend, dtype, shape):
    """fp16/bf16: tensor-core dots on fp16/bf16 operands, fp32 accumulation. Under the Triton interpreter,
    whose bf16 tl.dot multiplies bit patterns (triton-lang/triton#11584), bf16 takes fp32 operands: its cosines
    were ~3e5."""
    device = device_for(backend)
    x, mask, protos = make_inputs(*shape, dtype, device, requires_grad=True)
    full = [t.detach().float().requires_grad_() for t in (x, mask, protos)]
    expected = masked_cosine_reference(*full)
    out = masked_cosine(x, mask, protos, backend=backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    out.sum().backward()
    expected.sum().backward()
    for got, want in zip((x, mask, protos), full):
        # The gradient is a difference of terms of size ~1: its rounding error is the dtype's on them,
        # even where the difference is 0 (the one-element cosine, +-1, is flat).
        scale = max(want.grad.abs().max().item(), 1.0)
        torch.testing.assert_close(got.grad.float(), want.grad, atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("backend", backend_params("cuda", "triton"))
def test_float16_small_masks(backend):
    """Mask values below 2^-7 square into fp16 subnormals (and xh*m too): fp16 inputs take fp32 GEMM
    operands, so the cosine stays right (|C| came out 1.2 on fp16 operands for masks of 3e-4)."""
    device = device_for(backend)
    x, mask, protos = make_inputs(9, 20, 64, torch.float16, device, requires_grad=True)
    mask = (mask.detach() * 3e-4).half().requires_grad_()
    full = [t.detach().float().requires_grad_() for t in (x, mask, protos)]
    expected = masked_cosine_reference(*full)
    out = masked_cosine(x, mask, protos, backend=backend)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    out.sum().backward()
    expected.sum().backward()
    for got, want in zip((x, mask, protos), full):
        scale = want.grad.abs().max().item()
        torch.testing.assert_close(got.grad.float(), want.grad, atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("backend", backend_params("triton"))
@pytest.mark.parametrize("shape", [(1, 7, 13), (17, 35, 70), (70, 140, 200)])
def test_triton_fp32_follows_the_matmul_precision(backend, shape, fp32_matmul_precision, monkeypatch):
    from dpm_ops.triton import masked_cosine as kernels

    tiles = record_launches(monkeypatch, kernels, "_masked_cosine_tile_kernel")
    coefs = record_launches(monkeypatch, kernels, "_coef_grad_kernel")
    x, mask, protos = make_inputs(*shape, torch.float32, device_for(backend), requires_grad=True)
    out = masked_cosine(x, mask, protos, backend=backend)
    grads = torch.autograd.grad(out.sum(), (x, mask, protos))
    expected = masked_cosine_reference(x, mask, protos)
    torch.testing.assert_close(out, expected, **fp32_tolerances(fp32_matmul_precision))
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), (x, mask, protos))):
        torch.testing.assert_close(got, want, **fp32_tolerances(fp32_matmul_precision))
    assert len(tiles) == 2 and len(coefs) == 2  # forward and coefficient tiles; both coefficient GEMMs
    want = "ieee" if fp32_matmul_precision == "highest" else "tf32"
    assert {launch["PRECISION"] for launch in tiles + coefs} == {want}


# TF32 rounds the fp32 operands to 10 mantissa bits; bf16 to 7 (the products stay fp32).
PRECISION_TOLERANCES = {"highest": {"atol": 2e-5, "rtol": 1e-4}, "high": {"atol": 3e-3, "rtol": 3e-3}}


@needs_gpu
@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_cuda_float32_follows_the_matmul_precision(backend, precision, float32_matmul_precision):
    # The GEMMs are cuBLAS's: "highest" is IEEE fp32, "high" TF32 tensor cores (visibly different).
    x, mask, protos = make_inputs(256, 512, 1024, torch.float32, "cuda", seed=3, requires_grad=True)
    grad = torch.randn(256, 512, dtype=torch.float32, generator=torch.Generator().manual_seed(4)).cuda()
    inputs64 = [t.detach().double().requires_grad_(True) for t in (x, mask, protos)]
    expected = masked_cosine_reference(*inputs64)
    expected_grads = torch.autograd.grad(expected, inputs64, grad.double())
    float32_matmul_precision("highest")
    exact = masked_cosine(x, mask, protos, backend=backend).detach()
    float32_matmul_precision(precision)
    out = masked_cosine(x, mask, protos, backend=backend)
    grads = torch.autograd.grad(out, (x, mask, protos), grad)
    tol = PRECISION_TOLERANCES[precision]
    torch.testing.assert_close(out.double(), expected, **tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, **tol)
    assert torch.equal(out.detach(), exact) == (precision == "highest")


@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_gradients(backend, dtype):
    # bf16 / fp16 operands on tensor cores (fp32 products): value and gradients within the dtype's
    # rounding of the fp32 reference on the same (rounded) inputs.
    x, mask, protos = make_inputs(128, 300, 512, dtype, device_for(backend), seed=5, requires_grad=True)
    inputs32 = [t.detach().float().requires_grad_(True) for t in (x, mask, protos)]
    expected = masked_cosine_reference(*inputs32)
    grad = torch.randn(128, 300, generator=torch.Generator().manual_seed(6)).to(x.device)
    expected_grads = torch.autograd.grad(expected, inputs32, grad)
    out = masked_cosine(x, mask, protos, backend=backend)
    grads = torch.autograd.grad(out, (x, mask, protos), grad.to(dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    trained, den_sq = op_for("masked_cosine_train", backend)(x.detach(), mask.detach(), protos.detach(), 1e-12)
    assert trained.dtype == den_sq.dtype == torch.float32  # kept unrounded for the backward
    assert torch.equal(trained.to(dtype), out.detach())
    for got, want in zip(grads, expected_grads):
        assert ((got.float() - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["train", "recompute"])
def test_half_gradients_are_rounded_once(backend, dtype, path):
    """fp16 / bf16 gradients are the fp32 computation's, rounded once, as the reference's: the backward
    takes C unrounded (kept by the training op, or recomputed) and its GEMMs take fp32 operands. From the
    cosine rounded to the input dtype, or bf16 operands (CUDA, Triton), the mask's and prototypes'
    gradients, differences of terms of size ~1 that nearly cancel where a feature lies close to the
    prototypes' direction, were 3-4x the reference's error (float64 truth)."""
    if backend == "triton" and path == "train":
        pytest.skip("the Triton backend has no training op: its backward always recomputes C")
    device = device_for(backend)
    gen = torch.Generator().manual_seed(3)
    protos = torch.randn(2, 256, generator=gen)
    x = protos[0] + 0.02 * torch.randn(32, 256, generator=gen)
    mask = 0.5 + 0.5 * torch.rand(32, 256, generator=gen)
    grad = torch.randn(32, 2, generator=gen).to(dtype)
    inputs = [t.to(dtype).to(device) for t in (x, mask, protos)]
    truth = [t.detach().cpu().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(masked_cosine_reference(*truth), truth, grad.double())

    def gradients(name, op):
        leaves = [t.detach().requires_grad_() for t in inputs]
        if name == "reference":
            out = masked_cosine_reference(*leaves)
        elif path == "train":
            out = op_for("masked_cosine_train", name)(*leaves, 1e-12)[0].to(dtype)
        else:
            out = op_for(op, name)(*leaves, 1e-12)
        return torch.autograd.grad(out, leaves, grad.to(device))

    reference = gradients("reference", None)
    got = gradients(backend, "masked_cosine")
    for name, g, r, w in zip(("x", "mask", "protos"), got, reference, want):
        error, reference_error = ((t.cpu().double() - w).norm() / w.norm() for t in (g, r))
        assert error <= 1.25 * reference_error, (name, error.item(), reference_error.item())


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
def test_half_backward_takes_the_cosine_rounded_or_not(backend):
    """The backward op takes grad and out in the inputs' dtype (masked_cosine's) or their compute dtype
    (masked_cosine_train's): a rounded out is recomputed, so both give the same gradients; other dtypes are
    refused, naming both."""
    x, mask, protos = make_inputs(5, 7, 24, torch.float16, device_for(backend), seed=4)
    backward = op_for("masked_cosine_backward", backend)
    exact = masked_cosine_reference(*(t.float() for t in (x, mask, protos)))
    grad = torch.randn(5, 7, generator=torch.Generator().manual_seed(5)).half().float().to(x.device)
    from_rounded = backward(grad.half(), x, mask, protos, exact.half(), None, 1e-12)
    from_exact = backward(grad, x, mask, protos, exact, None, 1e-12)
    for a, b in zip(from_rounded, from_exact):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # one float16 rounding
    with pytest.raises(ValueError, match="out must be (torch.float16|Half) or (torch.float32|Float) as the forward"):
        backward(grad, x, mask, protos, exact.double(), None, 1e-12)


@pytest.mark.parametrize("backend", backend_params("reference", "cpp"))
def test_half_inputs_on_cpu(backend):
    # computed in fp32 by every backend, answered in the input dtype
    x, mask, protos = make_inputs(6, 8, 10, torch.bfloat16, "cpu")
    out = masked_cosine(x, mask, protos, backend=backend)
    assert out.dtype == torch.bfloat16
    expected = masked_cosine_reference(*(t.float() for t in (x, mask, protos)))
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_autocast_leaves_the_inner_gemms_in_the_input_dtype(backend):
    """Under bf16 autocast the op's own GEMMs must not be recast (the buffers around them are fp32)."""
    device = device_for(backend)
    x, mask, protos = make_inputs(6, 9, 20, torch.float32, device, requires_grad=True)
    expected = masked_cosine_reference(x, mask, protos)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = masked_cosine(x, mask, protos, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **tolerances(torch.float32))
    grads = torch.autograd.grad(got.sum(), (x, mask, protos))
    for g, e in zip(grads, torch.autograd.grad(expected.sum(), (x, mask, protos))):
        torch.testing.assert_close(g, e, **tolerances(torch.float32))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_arccos_distance(backend):
    device = device_for(backend)
    q, q_mask, g = make_inputs(6, 11, 16, torch.float32, device)
    g[3] = q[0]  # an exact match: cosine 1 with a full mask -> clipped, not NaN
    q_mask[0] = 1.0
    dist = masked_arccos_distance(q, q_mask, g, backend=backend)
    cos = masked_cosine_reference(q, q_mask, g).clamp(-1 + 1e-5, 1 - 1e-5)
    torch.testing.assert_close(dist, torch.arccos(cos), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(dist).all()
    assert dist[0, 3] == pytest.approx(math.acos(1 - 1e-5), abs=1e-4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x, m, p: (x[0], m[0], p), "x must be 2-D"),
        (lambda x, m, p: (x, m, p[0]), "protos must be 2-D"),
        (lambda x, m, p: (x, m[:, :-1], p), "mask must have the shape of x"),
        (lambda x, m, p: (x, m, p[:, :-1]), "protos must have C = "),
        (lambda x, m, p: (x, m.double(), p), "must share one dtype"),
        (lambda x, m, p: (x, m, p.double()), "must share one dtype"),
        (lambda x, m, p: (x.long(), m.long(), p.long()), "must be floating point"),
        (
            lambda x, m, p: (x.index_fill(0, torch.tensor([1], device=x.device), float("nan")), m, p),
            "x contains non-finite",
        ),
        (
            lambda x, m, p: (x, m, p.index_fill(1, torch.tensor([2], device=p.device), float("inf"))),
            "protos contains non-finite",
        ),
    ],
)
def test_bad_input_names_the_argument(backend, bad, message):
    x, mask, protos = make_inputs(3, 4, 5, torch.float32, device_for(backend))
    with pytest.raises(ValueError, match=message):
        masked_cosine(*bad(x, mask, protos), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "bad, message",
    [
        # Before: a RuntimeError from vector_norm (the values were checked before the dtypes)
        (lambda q, m, g: (q.long(), m, g), "q must be floating point, got torch.int64"),
        (lambda q, m, g: (q, m.bool(), g), r"q, q_mask and g must share one dtype, got torch.float32, torch.bool"),
        (lambda q, m, g: (q, m, g.to(torch.complex64)), "q, q_mask and g must share one dtype"),
        (lambda q, m, g: (q[0], m, g), r"q must be 2-D \(B, C\)"),
        (lambda q, m, g: (q, m, g.index_fill(0, torch.tensor([1], device=g.device), float("nan"))), "g contains"),
    ],
)
def test_masked_arccos_distance_names_its_own_arguments(backend, bad, message):
    q, q_mask, g = make_inputs(3, 4, 5, torch.float32, device_for(backend))
    with pytest.raises(ValueError, match=f"^masked_arccos_distance: {message}"):
        masked_arccos_distance(*bad(q, q_mask, g), backend=backend)


def test_bad_eps_and_backend():
    x, mask, protos = make_inputs(2, 3, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        masked_cosine(x, mask, protos, eps=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_cosine(x, mask, protos, backend="opencl")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            masked_cosine(x, mask.cuda(), protos)


def test_masked_arccos_distance_in_place_and_differentiable():
    """Without autograd the clip and arccos run in place on masked_cosine's output (one G x G matrix at a time:
    25 GB at MSMT17 scale), the same values as the out-of-place formula; with it, gradients flow."""
    from dpm_ops.ops.masked_cosine import ARCCOS_CLIP

    generator = torch.Generator().manual_seed(5)
    q, g = torch.randn(7, 12, generator=generator), torch.randn(9, 12, generator=generator)
    q_mask = torch.rand(7, 12, generator=generator)
    g[0] = q[0]  # a cosine of 1 before the mask: the clip at work
    cos = masked_cosine(q, q_mask, g)
    expected = torch.arccos(torch.clamp(cos, -1 + ARCCOS_CLIP, 1 - ARCCOS_CLIP))
    assert torch.equal(masked_arccos_distance(q, q_mask, g), expected)
    inputs = [t.double().requires_grad_() for t in (q[:3], q_mask[:3], g[:4])]
    assert torch.autograd.gradcheck(lambda *t: masked_arccos_distance(*t), inputs)
