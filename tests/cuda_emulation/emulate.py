"""Builds the CUDA code of csrc/ for the CPU under the emulator (include/emulated_cuda.h, README.md) into
one library: every CUDA entry point (*_cuda.cpp) with its kernels, as the CPU kernels of
``dpm_ops_emulated::<op>`` (the CUDA code path of each op, run on CPU tensors), and launchers.cpp's C
entry points to single torch-free launchers.

The sources are compiled as written, with the rewrites that plain C++ cannot spell: a launch
``kernel<<<grid, block, shared, stream>>>(args)`` becomes ``(::emu::Launch("kernel", grid, block,
shared, stream) << [=](auto... a) { kernel(a...); })(args)``, ``extern __shared__ ... name[];`` a
pointer to the block's dynamic shared memory, and ``__shared__ T name[n];`` a reference to the block's
instance of the variable (``::emu::block_shared``). Everything else (the built-in variables, barriers, warp
collectives, the runtime calls, c10's CUDA guard and stream) is declared by the headers in include/,
which stand in for CUDA's.

In a process that runs under AddressSanitizer (memcheck.sh preloads its runtime), the library is built
with it and with UBSan: an out-of-bounds access to global or shared memory, or undefined behaviour,
ends the process with a report, as compute-sanitizer's memcheck would on a GPU.
"""

import ctypes
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIBRARY = "dpm_ops_emulated"
# Where build() keeps its builds, one folder per digest of the sources (DPM_OPS_EMULATOR_CACHE: elsewhere).
CACHE = Path(os.environ.get("DPM_OPS_EMULATOR_CACHE", Path(tempfile.gettempdir()) / "dpm_ops_cuda_emulation"))
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];")
_SHARED = re.compile(r"__shared__ ([\w:]+) ([^;]+);")  # after _DYNAMIC_SHARED: `__shared__ T a[n], b;`
_DECLARATOR = re.compile(r"\s*(\w+)((?:\[[^\[\]]+\])*)\s*")
# g++ flags of every emulated source: no FMA contraction (README.md).
_FLAGS = ["-O1", "-g0", "-fPIC", "-ffp-contract=off", "-w", f"-I{HERE / 'include'}"]
# When the process runs under AddressSanitizer: it, and the checks of undefined behaviour (signed
# overflow, shifts, array bounds, misaligned or null accesses; not vptr: torch is built without RTTI
# checks), each report ending the process.
_SANITIZE = [
    "-fsanitize=address,undefined",
    "-fno-sanitize=vptr",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
]
_KEEP = []  # the schema definitions, alive as long as the process


def sanitized() -> bool:
    """Whether this process runs under AddressSanitizer (its runtime preloaded: memcheck.sh)."""
    return hasattr(ctypes.CDLL(None), "__asan_init")


def _block_shared(declaration: re.Match) -> str:
    """`__shared__ T a[n], b;` as `static char a_site; auto& a = ::emu::block_shared<T[n]>(&a_site); ...`:
    the site, a static of the declaring function, tells the emulator which variable (which instance of
    a template kernel) the block asks for."""
    rewritten = []
    for declarator in declaration[2].split(","):
        if not (found := _DECLARATOR.fullmatch(declarator)):
            raise ValueError(f"emulate.py cannot rewrite the shared memory declaration {declaration[0]!r}")
        name, extents = found[1], found[2]
        rewritten.append(
            f"static char {name}_site; auto& {name} = ::emu::block_shared<{declaration[1]}{extents}>(&{name}_site);"
        )
    return " ".join(rewritten)


def rewrite(text: str) -> str:
    text = _LAUNCH.sub(lambda m: f'(::emu::Launch("{m[1]}", {m[2]}) << [=](auto... a) {{ {m[1]}(a...); }})(', text)
    text = _DYNAMIC_SHARED.sub(r"unsigned char* \1 = ::emu::dynamic_shared();", text)
    return _SHARED.sub(_block_shared, text)


def _compile(command: list) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"emulated build failed: {' '.join(command)}\n{done.stderr[-4000:]}")


def _sources_key(sanitize: list) -> str:
    """A digest of everything the library is built from: csrc/, this folder, the flags, torch's version."""
    import torch

    digest = hashlib.sha256(" ".join([*_FLAGS, *sanitize, torch.__version__]).encode())
    for path in sorted(p for folder in (REPO / "csrc", HERE) for p in folder.rglob("*") if p.is_file()):
        if "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _compile_library(out: Path, sanitize: list) -> None:
    """Compiles every .cu and *_cuda.cpp of csrc/ (the entry points against torch's headers, include/'s
    c10/cuda stand-ins first) and launchers.cpp into out/emulated.so."""
    import torch
    import torch.utils.cpp_extension as extension

    csrc = out / "csrc"
    shutil.copytree(REPO / "csrc", csrc, dirs_exist_ok=True)
    for path in [*csrc.rglob("*.cu"), *csrc.rglob("*.cuh")]:
        path.write_text(rewrite(path.read_text()))
    launchers = out / "launchers.cpp"
    launchers.write_text(rewrite((HERE / "launchers.cpp").read_text()))
    torch_flags = [f"-I{p}" for p in extension.include_paths()]
    torch_flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")
    flags = _FLAGS + sanitize
    device = ["g++", "-std=c++17", "-D__CUDACC__", *flags, f"-I{csrc}", "-x", "c++", "-c"]
    host = ["g++", "-std=c++20", "-DDPM_OPS_WITH_CUDA", *flags, *torch_flags]
    host += ["-include", str(HERE / "include" / "emulated_entry_points.h"), "-c"]
    jobs = [device + [str(p)] for p in [*sorted(csrc.rglob("*.cu")), launchers]]
    jobs += [host + [str(p)] for p in sorted(csrc.rglob("*_cuda.cpp"))]
    objects = [out / f"{Path(job[-1]).parent.name}_{Path(job[-1]).name}.o" for job in jobs]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_compile, [job + ["-o", str(o)] for job, o in zip(jobs, objects)]))
    torch_lib = Path(torch.__file__).parent / "lib"
    _compile(
        ["g++", "-shared", *sanitize, *map(str, objects), f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
        + ["-ltorch", "-ltorch_cpu", "-lc10", "-o", str(out / "emulated.so")]
    )


@functools.cache
def build(cache: Path = CACHE) -> ctypes.CDLL:
    """The emulated library, built into cache/<digest of its sources and flags>/ unless a build of the
    same sources is there (the processes of one CI run share it), once per process: defines every declared op's schema
    under dpm_ops_emulated with the op's fake and autograd registrations, loads the library (the CUDA
    entry points register as those ops' CPU kernels) and registers the CUDA kernels that ops/knn_certified.py
    writes in Python, on the emulated stage ops. Returns the library, for launchers.cpp's entry points
    (call())."""
    import torch

    from dpm_ops.ops import knn_certified
    from dpm_ops.ops._declare import DECLARED, register_fake_and_autograd

    sanitize = _SANITIZE if sanitized() else []
    out = cache / _sources_key(sanitize)
    cache.mkdir(parents=True, exist_ok=True)
    # One build at a time (pytest-xdist's workers, CI's steps): a process that waited finds it done.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "emulated.so").exists():
            staging = Path(tempfile.mkdtemp(dir=cache))
            try:
                _compile_library(staging, sanitize)
                staging.rename(out)
            finally:  # a failed build leaves nothing behind
                shutil.rmtree(staging, ignore_errors=True)
    definitions = torch.library.Library(LIBRARY, "DEF")
    for name, op in DECLARED.items():
        definitions.define(name + op.schema)
    for name, op in DECLARED.items():
        backward = emulated_op(op.backward.name) if op.backward else None
        register_fake_and_autograd(op, f"{LIBRARY}::{name}", backward, definitions)
    for name, kernel in knn_certified.cuda_kernels(knn_certified.cublas(LIBRARY)).items():
        definitions.impl(name, kernel, "CPU")
    _KEEP.append(definitions)
    torch.ops.load_library(str(out / "emulated.so"))
    return _declare(ctypes.CDLL(str(out / "emulated.so")))


def emulated_op(name: str):
    """dpm_ops_emulated::<name> (the op's CUDA code path, on CPU tensors)."""
    import torch

    return getattr(getattr(torch.ops, LIBRARY), name).default


def serve_backend_cuda() -> None:
    """From now on in this process, backend "cuda" runs on CPU tensors, by the emulated CUDA code: an op
    called with backend="cuda" (or under forced_backend("cuda") or DPM_OPS_BACKEND=cuda) runs
    dpm_ops_emulated::<op> (its CUDA entry point; differentiable by the op's own autograd formula
    through the emulated backward op). For the op tests' backend "cuda" on machines without a GPU
    (tests/conftest.py, DPM_OPS_EMULATED_CUDA=1). Builds the library if need be."""
    from dpm_ops import _backend
    from dpm_ops.ops._declare import Op

    build()
    resolve, kernel = _backend.resolve, Op.kernel
    _backend._AVAILABILITY["cuda"] = (True, "")
    _backend.resolve = lambda backend, device: (
        "cuda" if _backend.requested(backend) == "cuda" else resolve(backend, device)
    )
    Op.kernel = lambda op, backend: emulated_op(op.name) if backend == "cuda" else kernel(op, backend)


P, I64, I32, BOOL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_bool

_SIGNATURES = {
    "knn_select": [I32, P, P, P, I64, I64, I64, I64, I32, BOOL, P, P, P, P, I64],
    "knn_certified_candidates": [I32, P, P, P, P, P, I64, I64, I64, I64, I64, I32, BOOL, P, P, P, P],
    "knn_certified_candidate_distances": [I32, P, P, P, P, P, P, P, I64, I64, I64, I32, BOOL, P],
    "deadlock": [],
    "out_of_bounds": [I32],
    "signed_overflow": [],
}


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, ctypes.c_int
    library.last_error.restype = ctypes.c_char_p
    library.set_schedule.argtypes, library.set_schedule.restype = [I32], None
    return library


def call(library: ctypes.CDLL, name: str, *args) -> None:
    """Runs launcher `name`; its error (a failed launch, a deadlock) as RuntimeError."""
    if getattr(library, name)(*args) != 0:
        raise RuntimeError(library.last_error().decode())
