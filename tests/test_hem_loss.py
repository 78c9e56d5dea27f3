"""hem_loss: every backend against the reference (dpm.md §4, §6), in value and gradient."""

import pytest
import torch

import dpm_ops
from conftest import backend_params, device_for, op_for
from dpm_ops.losses import HEMLoss
from dpm_ops.losses import hem_loss as loss_module_function
from dpm_ops.ops import hem_loss, hem_loss_reference

KERNEL_BACKENDS = backend_params("cpp", "cuda", "triton")

# (B, heads, N): empty batch, batch of one at DPM's 12 heads × 242 patches (stride 11), one head,
# one patch, heads not a power of two and N past several chunks, more heads than the Triton minimum tile.
SHAPES = [(0, 12, 20), (1, 12, 242), (3, 1, 5), (2, 12, 1), (4, 5, 130), (2, 20, 70), (5, 12, 210)]


def tolerances(dtype):
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}


def logits(shape, dtype=torch.float64, device="cpu", seed=0):
    """CLS->patch logits as the model hands them (pre-softmax, q·k·64^-1/2): a shared component makes
    the heads correlated, as in a real network, so the Gram is far from I."""
    gen = torch.Generator().manual_seed(seed)
    B, H, N = shape
    shared = torch.randn(B, 1, N, generator=gen, dtype=torch.float64)
    a = 2.0 * (torch.randn(B, H, N, generator=gen, dtype=torch.float64) + shared)
    return a.to(device, dtype)


def value_and_grad(fn, a, **kw):
    leaf = a.detach().clone().requires_grad_(True)
    value = fn(leaf, **kw)
    (grad,) = torch.autograd.grad(value * 0.7, leaf)  # an upstream gradient other than 1
    return value.detach(), grad


def assert_matches_reference(a, backend, **kw):
    value, grad = value_and_grad(lambda t, **k: hem_loss(t, backend=backend, **k), a, **kw)
    expected, expected_grad = value_and_grad(hem_loss_reference, a, **kw)
    assert value.shape == () and value.dtype == expected.dtype and grad.dtype == a.dtype
    torch.testing.assert_close(value, expected, equal_nan=True, **tolerances(a.dtype))
    torch.testing.assert_close(grad, expected_grad, **tolerances(a.dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, reduction, shape, dtype):
    if shape[0] == 0 and reduction == "mean":
        pytest.skip("the mean over no samples is a ValueError (test_empty_batch_sum_is_zero_mean_is_an_error)")
    a = logits(shape, dtype, device_for(backend), seed=sum(shape))
    assert_matches_reference(a, backend, reduction=reduction)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_batch_sum_is_zero_mean_is_an_error(backend):
    a = logits((0, 12, 20), device=device_for(backend))
    assert hem_loss(a, backend=backend).item() == 0.0
    with pytest.raises(
        ValueError, match="cls_logits must hold at least one sample"
    ):  # was NaN, torch's mean of nothing
        hem_loss(a, reduction="mean", backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_head_and_eps(backend):
    """An all-zero head: Â = 0 (eps keeps the norm finite), its diagonal entry contributes (0 − 1)²."""
    a = logits((3, 6, 40), device=device_for(backend))
    a[1, 2] = 0
    assert_matches_reference(a, backend)
    assert_matches_reference(a * 1e-3, backend, eps=1e-2)  # eps comparable to the norms: not negligible


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_extremes(backend):
    device = device_for(backend)
    identical_heads = torch.ones(3, 12, 20, dtype=torch.float64, device=device)
    # G = all ones (up to eps): 132 off-diagonal ones per sample, / 144, summed over the batch of 3
    assert hem_loss(identical_heads, backend=backend).item() == pytest.approx(3 * 132 / 144, rel=1e-6)
    orthogonal = 10.0 * torch.eye(12, 20, dtype=torch.float64, device=device).expand(2, 12, 20)
    assert hem_loss(orthogonal, backend=backend).item() < 1e-14


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_logits(backend):
    device = device_for(backend)
    a = logits((3, 40, 12), torch.float32, device).transpose(1, 2)  # (B, heads=12, N=40), strided
    assert not a.is_contiguous()
    assert_matches_reference(a, backend)
    assert_matches_reference(logits((3, 12, 80), torch.float32, device)[:, :, ::2], backend)


def test_cpp_takes_bfloat16_in_fp32():
    a = logits((4, 12, 50), torch.bfloat16)
    value, grad = value_and_grad(lambda t: hem_loss(t, backend="cpp"), a)
    expected, expected_grad = value_and_grad(hem_loss_reference, a)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradcheck_float64(backend, reduction):
    a = logits((2, 3, 7), device=device_for(backend)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: hem_loss(t, reduction=reduction, backend=backend), (a,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    a = logits((3, 5, 9), device=device_for(backend)).requires_grad_(True)
    for reduction in ("sum", "mean"):
        torch.library.opcheck(op_for("hem_loss", backend), (a, 1e-6, reduction))
        grad = torch.tensor(0.5, dtype=a.dtype, device=a.device)
        torch.library.opcheck(op_for("hem_loss_backward", backend), (grad, a.detach(), 1e-6, reduction))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    q = logits((2, 4, 1), device=device_for(backend)).requires_grad_(True)  # a CLS query per head
    k = logits((2, 4, 30), device=device_for(backend), seed=1).requires_grad_(True)

    def loss(q, k):  # the CLS row of the attention logits, as the model computes it, then HEM
        return 0.1 * hem_loss(q * k * 0.125, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(q, k)
    grads = torch.autograd.grad(value, (q, k))
    expected = 0.1 * hem_loss_reference(q * k * 0.125)
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_module_runs_the_fused_op_by_default(reduction):
    a = logits((6, 12, 64))
    fused = value_and_grad(lambda t: HEMLoss(reduction=reduction)(t), a)
    plain = value_and_grad(lambda t: loss_module_function(t, reduction=reduction, backend="reference"), a)
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))
    if dpm_ops.backends()["cpp"][0]:  # the fused op is what autograd recorded
        assert "dpm_ops_hem_loss" in loss_module_function(a.requires_grad_(True)).grad_fn.name()
    assert HEMLoss().backend is None and HEMLoss(backend="reference").backend == "reference"


@pytest.mark.parametrize("backend", backend_params("reference", "cpp", "cuda", "triton"))
@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda a: (a[0], {}), "cls_logits must be 3-D"),
        (lambda a: (a.long(), {}), "cls_logits must be floating point"),
        (lambda a: (a[:, :0], {}), "cls_logits must have at least one head"),
        (lambda a: (a, {"eps": 0.0}), "eps must be a finite number > 0"),
        (lambda a: (a, {"eps": float("inf")}), "eps must be a finite number > 0"),
        (lambda a: (a, {"reduction": "none"}), "reduction must be 'sum'"),
        (lambda a: (a.tolist(), {}), "cls_logits must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(backend, bad, message):
    a, kw = bad(logits((2, 3, 4), torch.float32, device_for(backend)))
    with pytest.raises(ValueError, match=message):
        hem_loss(a, backend=backend, **kw)


def test_direct_op_calls_check_too():
    a = logits((2, 3, 4))
    with pytest.raises(ValueError, match="reduction must be 'sum'"):
        torch.ops.dpm_ops.hem_loss(a, 1e-6, "none")
    with pytest.raises(ValueError, match="cls_logits must be 3-D"):
        torch.ops.dpm_ops.hem_loss_backward(torch.tensor(1.0, dtype=a.dtype), a[0], 1e-6, "sum")


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_large_batch_runs_the_parallel_passes(backend):
    """A batch big enough for several OpenMP tasks per pass (DPM's 64 × 12 Grams run on one thread)."""
    assert_matches_reference(logits((300, 12, 242), torch.float32, device_for(backend)), backend)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_the_math_in_fp32(backend, dtype):
    """Under bf16 autocast (DPM's training) the fused op's inner GEMMs stay fp32, as the logits given."""
    device = device_for(backend)
    a = logits((4, 12, 50), dtype, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        value, grad = value_and_grad(lambda t: hem_loss(t, backend=backend), a)
    expected, expected_grad = value_and_grad(lambda t: hem_loss_reference(t.float()), a)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_backward_takes_the_loss_gradient_from_any_device(backend):
    """A direct backward call may pass the loss's gradient on the CPU (it is read as a number): the CUDA kernel
    read the host pointer on the GPU, the Triton launcher took the CPU tensor's device for its launch."""
    logits = torch.randn(3, 4, 6, dtype=torch.float64, device=device_for(backend))
    expected = op_for("hem_loss_backward", backend)(torch.tensor(2.0, device=logits.device), logits, 1e-6, "sum")
    got = op_for("hem_loss_backward", backend)(torch.tensor(2.0), logits, 1e-6, "sum")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    shaped = op_for("hem_loss_backward", backend)(torch.tensor([[2.0]]), logits, 1e-6, "sum")  # one element, 2-D
    torch.testing.assert_close(shaped, expected, rtol=0, atol=0)
