"""dpm_ops._backend: what dpm_ops.backends() reports and why, which backend an op runs by default (by the
tensors' device and what is available), and the checks on a forced backend.

The tests set the availability table per test (as tests/cuda_emulation does), so every branch runs on
any machine; resolve() reads only the device's type, so a CUDA device needs no GPU here."""

import importlib.util
import threading
import types

import pytest
import torch

from conftest import EMULATED_CUDA
from dpm_ops import _backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def make_available(monkeypatch):
    """make_available("cpp", "triton"): those backends and the reference are available for one test, the
    others not; DPM_OPS_BACKEND is unset."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)

    def make(*names):
        for name in _backend.BACKENDS:
            ok = name == "reference" or name in names
            monkeypatch.setitem(_backend._AVAILABILITY, name, (ok, "" if ok else f"{name} is off in this test"))

    return make


@pytest.mark.parametrize("interpret", ["1", None])
@pytest.mark.parametrize("without_triton", [False, True])
def test_availability_and_why_not(monkeypatch, interpret, without_triton):
    # The report for each result of loading the extension: missing, built without CUDA, built with it.
    # Triton runs on a GPU, or on CPU tensors under its interpreter (TRITON_INTERPRET=1), if installed.
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    if without_triton:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name))
    gpu = torch.cuda.is_available()
    if importlib.util.find_spec("triton") is None:
        triton = (False, "triton is not installed (pip install triton)")
    else:
        triton = (True, "") if gpu or interpret == "1" else (False, "no CUDA GPU and TRITON_INTERPRET is not 1")
    missing = "dpm_ops._C could not be imported (No module named 'dpm_ops._C')"
    cases = [
        ((None, missing), (False, missing), (False, missing)),
        (
            (types.SimpleNamespace(with_cuda=False), ""),
            (True, ""),
            (False, "the extension was built without CUDA (CPU torch or no CUDA toolkit)"),
        ),
        ((types.SimpleNamespace(with_cuda=True), ""), (True, ""), (gpu, "" if gpu else "no CUDA GPU is visible")),
    ]
    for extension, cpp, cuda in cases:
        monkeypatch.setattr(_backend, "_EXTENSION", extension)
        assert _backend._availability() == {"reference": (True, ""), "cpp": cpp, "cuda": cuda, "triton": triton}


@pytest.mark.parametrize(
    "available, on_cuda, on_cpu",
    [
        (("cpp", "cuda", "triton"), "cuda", "cpp"),
        (("cpp", "triton"), "triton", "cpp"),  # an extension built without CUDA: Triton for CUDA tensors
        (("cpp",), "reference", "cpp"),
        (("triton",), "triton", "reference"),  # no extension
        ((), "reference", "reference"),
    ],
)
def test_default_backend_by_device(make_available, available, on_cuda, on_cpu):
    make_available(*available)
    assert _backend.resolve(None, CUDA) == on_cuda
    assert _backend.resolve(None, CPU) == on_cpu


def test_an_empty_environment_variable_is_the_default(make_available, monkeypatch):
    # DPM_OPS_BACKEND= (set but empty, as a shell script may leave it): by device, not a bad backend name
    make_available("cpp")
    monkeypatch.setenv(_backend.ENV_VAR, "")
    assert _backend.resolve(None, CPU) == "cpp"


def test_an_environment_variable_that_cannot_run_is_named(make_available, monkeypatch):
    # The failing op call did not name a backend: the message says where the one that failed came from.
    make_available("cpp")
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"^environment variable DPM_OPS_BACKEND='bogus': backend must be one of"):
        _backend.resolve(None, CPU)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with pytest.raises(
        RuntimeError, match=r"^environment variable DPM_OPS_BACKEND='triton': dpm_ops backend 'triton' is"
    ):
        _backend.resolve(None, CUDA)
    with pytest.raises(ValueError, match=r"^backend must be one of"):  # a backend= of the call is its own
        _backend.resolve("bogus", CPU)
    with _backend.forced_backend("reference"):  # forced_backend overrides the variable
        assert _backend.resolve(None, CPU) == "reference"


def test_forced_backend_takes_only_a_backend_name():
    with pytest.raises(
        ValueError, match=r"^backend must be one of \('reference', 'cpp', 'cuda', 'triton'\), got 'gpu'"
    ):
        with _backend.forced_backend("gpu"):
            pass


def test_forced_backend_blocks_nest(make_available):
    # leaving the inner block restores the outer one's backend, not the default
    make_available("cpp")
    with _backend.forced_backend("reference"):
        with _backend.forced_backend("cpp"):
            assert _backend.resolve(None, CPU) == "cpp"
        assert _backend.resolve(None, CPU) == "reference"
    assert _backend.resolve(None, CPU) == "cpp"


def test_forced_backend_is_per_thread(make_available):
    # A block in one thread (an ONNX export in a serving process) leaves the ops of other threads alone, as
    # torch's own modes (no_grad, autocast) do; with one process-wide value, blocks overlapping in two threads
    # also restored each other's backend, and the last to leave kept the other's for good.
    make_available("cpp")
    entered, left = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def block(name, leave_first):
        with _backend.forced_backend(name):
            entered.wait()
            seen[name] = _backend.resolve(None, CPU)
            if not leave_first:
                left.wait()
        if leave_first:
            left.wait()
        seen[name, "after"] = _backend.resolve(None, CPU)

    with _backend.forced_backend("reference"):
        threads = [threading.Thread(target=block, args=args) for args in (("reference", True), ("cpp", False))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert _backend.resolve(None, CPU) == "reference"  # this thread's block, whatever the others did
    assert seen == {"reference": "reference", "cpp": "cpp", ("reference", "after"): "cpp", ("cpp", "after"): "cpp"}
    assert _backend.resolve(None, CPU) == "cpp"


def test_compiled_code_sees_the_forced_backend():
    # torch.compile guards on this thread's forced backend: code compiled outside a block is recompiled inside it
    compiled = torch.compile(lambda x: x + (_backend.requested() == "reference"), fullgraph=True, backend="eager")
    x = torch.zeros(1)
    assert compiled(x).item() == 0
    with _backend.forced_backend("reference"):
        assert compiled(x).item() == 1
    assert compiled(x).item() == 0


@pytest.mark.skipif(EMULATED_CUDA, reason="the CUDA emulator runs backend 'cuda' on CPU tensors")
def test_a_forced_backend_that_cannot_run_raises(make_available, monkeypatch):
    make_available("cpp", "triton")
    with pytest.raises(RuntimeError, match="dpm_ops backend 'cuda' is not available: cuda is off in this test"):
        _backend.resolve("cuda", CUDA)
    make_available("cpp", "cuda", "triton")
    with pytest.raises(ValueError, match="backend 'cpp' runs on CPU tensors, got tensors on cuda"):
        _backend.resolve("cpp", CUDA)
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors, got tensors on cpu"):
        _backend.resolve("cuda", CPU)
    assert _backend.resolve("triton", CUDA) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("triton", CPU) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"backend 'triton' runs on CUDA tensors \(or CPU tensors under TRITON"):
        _backend.resolve("triton", CPU)
