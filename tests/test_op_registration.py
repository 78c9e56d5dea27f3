"""The custom ops pass torch.library.opcheck and compile with torch.compile(fullgraph=True)."""

import pytest
import torch

from conftest import backend_params, device_for
from dpm_ops.ops import masked_cosine, masked_cosine_reference


def _inputs(device, dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(3)
    shapes = ((5, 12), (5, 12), (7, 12))
    ts = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    ts[1] = ts[1].sigmoid()
    return [t.to(device).requires_grad_(requires_grad) for t in ts]


def _op_for(backend):
    return torch.ops.dpm_ops.masked_cosine if backend in ("cpp", "cuda") else torch.ops.dpm_ops.masked_cosine_triton


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
def test_opcheck(backend):
    x, mask, protos = _inputs(device_for(backend))
    torch.library.opcheck(_op_for(backend), (x, mask, protos, 1e-12))


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_opcheck_train_op(backend):
    x, mask, protos = _inputs(device_for(backend))
    torch.library.opcheck(torch.ops.dpm_ops.masked_cosine_train, (x, mask, protos, 1e-12))


@pytest.mark.parametrize("keep_den", [False, True], ids=["den-recomputed", "den-kept"])
@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_opcheck_backward_op(backend, keep_den):
    x, mask, protos = _inputs(device_for(backend), requires_grad=False)
    out, den_sq = torch.ops.dpm_ops.masked_cosine_train(x, mask, protos, 1e-12)
    args = (torch.randn_like(out), x, mask, protos, out, den_sq if keep_den else None, 1e-12)
    torch.library.opcheck(torch.ops.dpm_ops.masked_cosine_backward, args)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda"))
def test_both_backward_paths_agree(backend):
    """The training variant's kept den^2 gives the gradients of the recomputing backward, bit for bit."""
    x, mask, protos = _inputs(device_for(backend))
    grad = torch.randn(x.shape[0], protos.shape[0], dtype=x.dtype, device=x.device)
    recomputed = torch.autograd.grad(torch.ops.dpm_ops.masked_cosine(x, mask, protos, 1e-12), (x, mask, protos), grad)
    kept = torch.autograd.grad(
        torch.ops.dpm_ops.masked_cosine_train(x, mask, protos, 1e-12)[0], (x, mask, protos), grad
    )
    for a, b in zip(recomputed, kept):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params("cpp", "cuda", "triton"))
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, mask, protos = _inputs(device_for(backend))

    def loss(x, mask, protos):
        return (masked_cosine(x * 2, mask, protos, backend=backend) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x, mask, protos)
    grads = torch.autograd.grad(value, (x, mask, protos))
    expected = (masked_cosine_reference(x * 2, mask, protos) ** 2).sum()
    torch.testing.assert_close(value, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, mask, protos))):
        torch.testing.assert_close(got, want)
