"""What every Triton launcher shares: the device guard and the dot-precision rule."""

import contextlib
import importlib
import inspect
import pkgutil

import pytest
import torch

triton = pytest.importorskip("triton")

import dpm_ops.triton  # noqa: E402
from dpm_ops.triton._device import on_input_device  # noqa: E402
from dpm_ops.triton._precision import dot_precision  # noqa: E402

# The ops' entry points into the Triton kernels (dpm_ops/ops/*.py and the CI's compile checks call these).
LAUNCHERS = {
    "masked_cosine": ["masked_cosine_forward", "masked_cosine_backward"],
    "knn": ["knn_forward", "self_lists", "self_knn_forward"],
    "knn_certified": ["stage1", "candidate_distances"],
    "hierarchical_mask_pool": ["hierarchical_mask_pool_forward", "hierarchical_mask_pool_backward"],
    "masked_arcface": ["loss_and_grads"],
    "batch_hard_triplet": ["loss_and_grad"],
    "hem_loss": ["hem_loss_forward", "hem_loss_backward"],
    "maskreid_ranking_loss": ["ranking_loss_forward"],
}


def kernel_modules():
    return {
        info.name: importlib.import_module(f"dpm_ops.triton.{info.name}")
        for info in pkgutil.iter_modules(dpm_ops.triton.__path__)
        if not info.name.startswith("_")
    }


def test_every_public_launcher_is_device_guarded():
    guarded = on_input_device(len).__code__
    modules = kernel_modules()
    assert set(modules) == set(LAUNCHERS)
    for name, module in modules.items():
        public = [
            fn
            for attr, fn in vars(module).items()
            if inspect.isfunction(fn) and not attr.startswith("_") and inspect.unwrap(fn).__module__ == module.__name__
        ]
        assert sorted(fn.__name__ for fn in public) == sorted(LAUNCHERS[name]), name
        for fn in public:
            assert fn.__code__ is guarded, f"{name}.{fn.__name__} is not decorated with on_input_device"


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1: what the guard reads."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_guard_makes_the_inputs_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []
    launcher = on_input_device(lambda *args, **kwargs: seen.append((args, kwargs)) or "out")
    x = torch.zeros(2).as_subclass(_OnCuda1)
    assert launcher([x], 3, flag=True) == "out"  # a list of tensors (the pooling launchers) counts too
    assert entered == [torch.device("cuda", 1)] and seen == [(([x], 3), {"flag": True})]
    launcher(torch.zeros(2), 3)  # CPU tensors (the interpreter): no CUDA device is touched
    assert len(entered) == 1


def test_dot_precision_rule(fp32_matmul_precision):
    assert dot_precision(torch.float32) == ("ieee" if fp32_matmul_precision == "highest" else "tf32")
    assert dot_precision(torch.float64) == "ieee"
    assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "input"


@pytest.mark.parametrize("precision", ["highest", "high", "medium", "ieee", "tf32"])
def test_ieee_fp32_matmuls_restores_either_api(precision, float32_matmul_precision):
    """ieee_fp32_matmuls turns TF32 (CUDA) and oneDNN's bf16 / TF32 passes (CPU) off inside the block and gives back
    the setting as it was, through the fp32_precision API: torch's legacy getter raises once a program has set that
    API (torch.backends.fp32_precision = "tf32"), which made every fp32 Triton launch and the certified search's
    IEEE GEMMs raise."""
    from dpm_ops._precision import cuda_fp32_matmul_is_tf32, ieee_fp32_matmuls

    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    ieee = x @ x.T
    float32_matmul_precision(precision)
    settings = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [setting.fp32_precision for setting in settings]
    tf32 = precision in ("high", "medium", "tf32")
    assert cuda_fp32_matmul_is_tf32() == tf32 and dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
    with ieee_fp32_matmuls():
        assert [setting.fp32_precision for setting in settings] == ["ieee", "ieee"]
        assert not cuda_fp32_matmul_is_tf32() and dot_precision(torch.float32) == "ieee"
        inside = x @ x.T
    assert [setting.fp32_precision for setting in settings] == before
    assert torch.equal(inside, ieee)  # "medium" runs CPU matmuls in bf16 passes on CPUs with AVX512-BF16 / AMX
    if precision not in ("ieee", "tf32"):
        assert torch.get_float32_matmul_precision() == precision  # a legacy-API program's getter still works
