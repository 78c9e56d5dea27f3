"""Builds dpm_ops and its C++ (OpenMP) / CUDA extension dpm_ops._C.

    pip install --no-build-isolation .     # compiles against the torch you run (recommended)

CUDA kernels are built when torch has CUDA and a toolkit is found, or FORCE_CUDA=1.
Under plain `pip install .` (build isolation hides torch) the package installs without a compiled
extension and dpm_ops compiles its ops on first import instead (see dpm_ops/_extension.py).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("dpm_ops_sources", ROOT / "dpm_ops" / "_sources.py")
src = importlib.util.module_from_spec(spec)
spec.loader.exec_module(src)


class BuildPyWithSources(build_py):
    """Ships csrc/ and python_bindings/ inside the package, for compiling on first import."""

    def run(self):
        super().run()
        for sub in src.SOURCE_DIRS:
            target = Path(self.build_lib) / "dpm_ops" / src.BUNDLED_DIR / sub
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / sub, target)


def extension_and_cmdclass():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "dpm_ops: torch is not importable in this build environment (build isolation); installing "
            "without a compiled extension: the ops compile on first import. To compile now: "
            "pip install --no-build-isolation .",
            file=sys.stderr,
        )
        return [], {"build_py": BuildPyWithSources}
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)
    flags = src.compile_flags(with_cuda)
    rel = [os.path.relpath(p, ROOT) for p in src.sources(ROOT, with_cuda)]
    kind = CUDAExtension if with_cuda else CppExtension
    compile_args = {"cxx": flags["cxx"], "nvcc": flags["nvcc"]} if with_cuda else flags["cxx"]
    ext = kind("dpm_ops._C", rel, extra_compile_args=compile_args, extra_link_args=flags["ldflags"])
    return [ext], {"build_ext": BuildExtension, "build_py": BuildPyWithSources}


ext_modules, cmdclass = extension_and_cmdclass()
setup(
    packages=find_packages(include=["dpm_ops", "dpm_ops.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
