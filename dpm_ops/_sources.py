"""Where the C++/CUDA sources are and how they are compiled.

The one list of sources, shared by setup.py (ahead-of-time build) and dpm_ops._extension
(compile on first import); CMakeLists.txt applies the same globbing rule. Standard library only:
setup.py loads this file before dpm_ops is importable.
"""

import os
from pathlib import Path

# Sources travel inside the package (dpm_ops/_csrc) when installed without a compiled extension.
BUNDLED_DIR = "_csrc"
SOURCE_DIRS = ("csrc", "python_bindings")


def source_root() -> Path:
    package = Path(__file__).resolve().parent
    bundled = package / BUNDLED_DIR
    return bundled if bundled.is_dir() else package.parent


def is_cuda_source(path: Path) -> bool:
    return path.suffix == ".cu" or path.name.endswith("_cuda.cpp")


def sources(root: Path, with_cuda: bool) -> list:
    """Every .cpp / .cu under csrc/ and python_bindings/; CUDA ones only when building CUDA."""
    found = []
    for sub in SOURCE_DIRS:
        for path in sorted((root / sub).rglob("*")):
            if path.suffix in (".cpp", ".cu") and (with_cuda or not is_cuda_source(path)):
                found.append(str(path))
    return found


def cuda_arch_flags() -> list:
    """sm_80 and sm_90 machine code, and sm_90 PTX that newer GPUs (Blackwell) compile when the
    extension loads, unless TORCH_CUDA_ARCH_LIST says otherwise (torch then adds its own flags)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]


# DPM_OPS_SANITIZE=1: the C++ code under AddressSanitizer and the checks of undefined behaviour
# (signed overflow, shifts, array bounds, misaligned or null accesses; not vptr: torch is built without
# RTTI checks) and of float-to-int overflow (not among GCC's "undefined"), each report ending the
# process, its source lines named (-g1). Loading it needs the sanitizer's runtime preloaded
# (scripts/sanitize_cpu.sh).
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined,float-cast-overflow",
    "-fno-sanitize=vptr",
    "-fno-sanitize-recover=undefined,float-cast-overflow",
    "-fno-omit-frame-pointer",
    "-fno-wrapv",  # setup.py's compiler takes Python's -fwrapv, under which signed overflow is no error
    "-g1",
]


def compile_flags(with_cuda: bool) -> dict:
    defines = ["-DDPM_OPS_WITH_CUDA"] if with_cuda else []
    sanitize = SANITIZE_FLAGS if os.environ.get("DPM_OPS_SANITIZE") == "1" else []
    return {
        # -g0: Python's build flags ask for debug info, which doubles the compile time of the
        # template-heavy kernels (torch adds its own -std)
        "cxx": ["-O3", "-g0", "-fopenmp"] + defines + sanitize,
        "nvcc": ["-O3"] + defines + cuda_arch_flags(),
        "ldflags": ["-fopenmp"] + sanitize,
    }
