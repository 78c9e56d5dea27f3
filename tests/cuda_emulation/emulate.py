"""Builds the CUDA kernels of csrc/ for the CPU under the emulator (include/emulated_cuda.h) and loads
their torch-free launchers through launchers.cpp's C entry points (README.md).

The sources are compiled as written, with two rewrites that plain C++ cannot spell: a launch
``kernel<<<grid, block, shared, stream>>>(args)`` becomes ``::emu::launch(kernel, "kernel", grid,
block, shared, stream)(args)``, and ``extern __shared__ ... name[];`` a pointer to the block's dynamic
shared memory. Everything else (the built-in variables, barriers, warp collectives, the runtime calls)
is declared by the headers in include/, which stand in for CUDA's.
"""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# The .cu files built, relative to csrc/ (every one that launchers.cpp calls into).
SOURCES = ("knn/knn_cuda.cu", "knn/knn_certified_cuda.cu")
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(", re.S)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];")


def rewrite(text: str) -> str:
    text = _LAUNCH.sub(lambda m: f'::emu::launch({m[1]}, "{m[1]}", {m[2]})(', text)
    return _DYNAMIC_SHARED.sub(r"unsigned char* \1 = ::emu::dynamic_shared();", text)


def build(out: Path) -> ctypes.CDLL:
    """Compiles SOURCES and launchers.cpp into out/emulated.so and loads it."""
    csrc = out / "csrc"
    shutil.copytree(REPO / "csrc", csrc, dirs_exist_ok=True)
    for path in list(csrc.rglob("*.cu")) + list(csrc.rglob("*.cuh")):
        path.write_text(rewrite(path.read_text()))
    (out / "launchers.cpp").write_text(rewrite((HERE / "launchers.cpp").read_text()))
    library = out / "emulated.so"
    command = [
        "g++", "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-D__CUDACC__", "-U_FORTIFY_SOURCE", "-ffp-contract=off", "-w",
        f"-I{HERE / 'include'}", f"-I{csrc}",
        "-x", "c++", *(str(csrc / s) for s in SOURCES), str(out / "launchers.cpp"),
        "-o", str(library),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return _declare(ctypes.CDLL(str(library)))


P, I64, I32, BOOL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_bool

_SIGNATURES = {
    "knn_select": [I32, P, P, P, I64, I64, I64, I64, I32, BOOL, P, P, P, P, I64],
    "knn_certified_candidates": [I32, P, P, P, P, P, I64, I64, I64, I64, I64, I32, BOOL, P, P, P, P],
    "knn_certified_candidate_distances": [I32, P, P, P, P, P, P, P, I64, I64, I64, I32, BOOL, P],
    "deadlock": [],
}


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    for name, arguments in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, ctypes.c_int
    library.last_error.restype = ctypes.c_char_p
    return library


def call(library: ctypes.CDLL, name: str, *args) -> None:
    """Runs launcher `name`; its error (a failed launch, a deadlock) as RuntimeError."""
    if getattr(library, name)(*args) != 0:
        raise RuntimeError(library.last_error().decode())
