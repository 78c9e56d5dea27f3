"""Test setup: Triton kernels run on CPU tensors under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any Triton kernel module is imported.
"""

import os
import random
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

# CI runs the property tests (test_*_properties.py) reproducibly: the same examples on every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (-n N) the N workers share the cores: each runs torch, and the processes it starts,
# on its share of the threads (N workers each with every core's thread would oversubscribe them).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())

import dpm_ops  # noqa: E402  (after TRITON_INTERPRET)
from dpm_ops.ops._declare import DECLARED  # noqa: E402

# DPM_OPS_EMULATED_CUDA=1 on a machine without a GPU: the tests' backend "cuda" runs the CUDA code
# under the emulator (tests/cuda_emulation), on CPU tensors; tests that need CUDA tensors are skipped.
EMULATED_CUDA = os.environ.get("DPM_OPS_EMULATED_CUDA") == "1" and not torch.cuda.is_available()
if EMULATED_CUDA:
    from cuda_emulation import emulate

    emulate.serve_backend_cuda()


# Tests of what only a GPU shows (TF32 GEMMs, the GPU's own rounding): skipped without one, under the
# emulator too.
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="runs on a GPU's own arithmetic (CUDA tensors)")


def backend_params(*names):
    """pytest params for backends, each skipped with the reason dpm_ops.backends() gives."""
    available = dpm_ops.backends()
    return [pytest.param(n, marks=pytest.mark.skipif(not available[n][0], reason=available[n][1] or n)) for n in names]


def op_for(name: str, backend: str):
    """The registered custom op that ``backend`` runs: ``torch.ops.dpm_ops.<name>`` (the C++ / CUDA op), its
    ``<name>_triton`` twin, or under the emulator (EMULATED_CUDA) the op's emulated CUDA code for "cuda"."""
    return DECLARED[name].kernel(backend)


def device_for(backend: str) -> torch.device:
    if torch.cuda.is_available() and backend in ("cuda", "triton"):
        return torch.device("cuda")
    return torch.device("cpu")


def emulated_on_cpu(backend: str) -> bool:
    """Whether `backend` runs here on CPU tensors in software, thousands of times slower than a GPU: Triton
    under its interpreter, CUDA under the emulator. The GPU-sized cases skip there (they run on GPUs)."""
    return backend in ("cuda", "triton") and device_for(backend).type == "cpu"


def sign_rows(count, dim, seed=0, dtype=torch.float32):
    """Rows of four +-1 entries: every distance exact in fp32, equal values everywhere (the k-NN tie tests)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (count, dim), generator=gen).to(dtype) * 2 - 1
    keep = torch.rand(count, dim, generator=gen).argsort(dim=1)[:, :4]
    return torch.zeros(count, dim, dtype=dtype).scatter_(1, keep, signs.gather(1, keep))


@pytest.fixture(autouse=True)
def seeded_generators(request):
    """Every test starts its global generators (torch, numpy, random) from a seed of its own id: its random
    inputs are the same whichever tests an xdist worker ran before it (a test that passed or failed by the
    order it ran in was flaky in CI)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


FP32_PRECISION_SETTINGS = (torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)


@pytest.fixture
def float32_matmul_precision():
    """Sets torch's fp32 matmul precision for one test: a legacy name ("highest", "high", "medium") through
    torch.set_float32_matmul_precision, "ieee" / "tf32" through the fp32_precision API (torch.backends.fp32_precision,
    after which torch's legacy getter raises); both are restored after it."""
    legacy = torch.get_float32_matmul_precision()
    before = [setting.fp32_precision for setting in FP32_PRECISION_SETTINGS]

    def choose(precision: str) -> None:
        if precision in ("ieee", "tf32"):
            torch.backends.fp32_precision = precision
        else:
            torch.set_float32_matmul_precision(precision)

    yield choose
    torch.set_float32_matmul_precision(legacy)
    for setting, precision in zip(FP32_PRECISION_SETTINGS, before):
        setting.fp32_precision = precision


@pytest.fixture(params=["highest", "high", "tf32"])
def fp32_matmul_precision(request, float32_matmul_precision):
    """Each torch fp32 matmul precision in turn (the Triton GEMM tiles follow it: IEEE, then TF32 set by
    set_float32_matmul_precision, then by the fp32_precision API)."""
    float32_matmul_precision(request.param)
    return request.param


def fp32_tolerances(precision: str) -> dict:
    """IEEE fp32, or TF32's 10-bit mantissa (the interpreter may multiply in full precision)."""
    return {"atol": 2e-5, "rtol": 1e-4} if precision == "highest" else {"atol": 1e-2, "rtol": 1e-2}


def record_launches(monkeypatch, module, kernel_name: str) -> list:
    """Stands in for `module.kernel_name` (a Triton kernel): every launch still runs, and its keyword
    arguments (the constexprs) are appended to the returned list."""
    kernel = getattr(module, kernel_name)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, kernel_name, Recorder())
    return launches


def record_kernels(monkeypatch) -> list:
    """The (op name, backend) of every declared op's kernel run from now on (Op.run looks the kernel up;
    backend "reference" looks up none): a kernel test checks that its backend's kernel ran, since a
    `backend=` that silently ran the reference would match the reference exactly."""
    from dpm_ops.ops._declare import Op

    original, runs = Op.kernel, []
    monkeypatch.setattr(Op, "kernel", lambda op, backend: runs.append((op.name, backend)) or original(op, backend))
    return runs


def record_figures(monkeypatch) -> dict:
    """{out_png: Figure} of every picture dpm_ops.visualize writes from now on (each is still written):
    the curves, images, titles and texts a picture shows can be read back from its real matplotlib figure."""
    from dpm_ops.visualize import curves, masks, ranked

    figures = {}
    for module in (curves, masks, ranked):

        def save(fig, out_png, write=module._save):
            figures[os.fspath(out_png)] = fig
            return write(fig, out_png)

        monkeypatch.setattr(module, "_save", save)
    return figures


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(heading: str) -> str:
    """README.md's section titled `heading` (without its #s): the text from that heading to the next heading
    of any level, so a section's subsections are not part of it."""
    section, found, in_fence = [], False, False
    for line in README.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#+ ", line):  # a comment line in a code block is no heading
            if found:
                break
            found = line.lstrip("#").strip() == heading
            continue
        if found:
            section.append(line)
    assert found, f"README.md has no section titled {heading!r}"
    return "".join(section)


def readme_python_blocks(heading: str) -> list[str]:
    """The ```python blocks of README.md's section titled `heading`."""
    return re.findall(r"```python\n(.*?)```", readme_section(heading), re.S)
