"""Loads the compiled extension dpm_ops._C, compiling it on first import when it is missing.

`pip install --no-build-isolation .` compiles the extension at install time. A plain
`pip install .` (build isolation hides torch from setup.py) installs the Python package with its
C++ sources bundled; the first import then compiles them with torch.utils.cpp_extension.load into a
cache keyed by torch and Python versions, announced on stderr. DPM_OPS_JIT=1 forces that path,
DPM_OPS_CACHE_DIR moves the cache.
"""

import importlib
import os
import sys
from pathlib import Path

import torch

from . import _sources


def _cache_dir() -> Path:
    base = Path(os.environ.get("DPM_OPS_CACHE_DIR", Path.home() / ".cache" / "dpm_ops"))
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return base / tag


def compile_on_import():
    """Compiles the bundled sources (once per torch version) and loads them as a module."""
    from torch.utils.cpp_extension import CUDA_HOME, load

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"dpm_ops: compiling the C++{'/CUDA' if with_cuda else ''} ops for torch {torch.__version__} "
        f"into {build_dir} (first import only)...",
        file=sys.stderr,
        flush=True,
    )
    flags = _sources.compile_flags(with_cuda)
    return load(
        name="_C",
        sources=_sources.sources(_sources.source_root(), with_cuda),
        extra_cflags=flags["cxx"],
        extra_cuda_cflags=flags["nvcc"],
        extra_ldflags=flags["ldflags"],
        build_directory=str(build_dir),
        is_python_module=True,
        verbose=False,
    )


def load_extension():
    """Returns (module or None, reason it is missing)."""
    if os.environ.get("DPM_OPS_JIT") != "1":
        try:
            module = importlib.import_module("dpm_ops._C")
        except ImportError as error:  # not built, or built for another torch (undefined symbols)
            reason = f"dpm_ops._C could not be imported ({error})"
        else:  # it loaded, so its registrations are live; a version change is worth a word only
            built = ".".join(map(str, module.torch_version))
            if built != torch.__version__.split("+")[0]:
                print(
                    f"dpm_ops: the extension was built for torch {built}, running {torch.__version__}; "
                    "reinstall dpm_ops if ops misbehave",
                    file=sys.stderr,
                )
            return module, ""
        if not (_sources.source_root() / "csrc").is_dir():
            return None, reason + "; no bundled sources to compile"
    try:
        return compile_on_import(), ""
    except Exception as error:  # a compiler or toolchain problem: keep the pure-torch backends usable
        print(
            f"dpm_ops: compiling the ops failed, only the reference/triton backends are available: {error}",
            file=sys.stderr,
        )
        return None, f"compiling the ops failed: {error}"
