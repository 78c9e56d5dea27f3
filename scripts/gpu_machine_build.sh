#!/usr/bin/env bash
# The GPU machine's build, without a GPU: a venv with the torch that machine runs (2.11.0, CUDA 13.0
# build, from PyPI), then scripts/gpu_check.sh's build step on a copy of the repository (FORCE_CUDA=1,
# sm_90, setup.py build_ext), an import that checks every op has a CUDA kernel, and the whole test
# suite under that torch and its Triton (3.6, the interpreter here). Catches what the per-file checks
# cannot: the setuptools build itself, symbols left undefined at link time, code whose meaning changes
# with the C++ standard (torch 2.11 compiles extensions as C++17, CI's torch as C++20), and Python API
# drift between CI's torch / Triton and the GPU machine's (a GPU run would fail on it).
#   scripts/gpu_machine_build.sh [WORKDIR]   (~3.8 GB venv; ~10 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
if (($#)); then work=$1; else work=$(mktemp -d) && trap 'rm -rf "$work"' EXIT; fi
torch_gpu=2.11.0  # the GPU machine's torch (+cu130); its triton, 3.6, comes with it

cuda_home=${CUDA_HOME:-/usr/local/cuda}  # the toolkit's own folder: torch takes its headers and nvcc there
[[ -x $cuda_home/bin/nvcc ]] || { echo "no CUDA toolkit in $cuda_home (set CUDA_HOME)"; exit 1; }

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==$torch_gpu" "numpy<2.4" pybind11 ninja \
  $(grep -E '^(pytest|pytest-xdist|pytest-benchmark|hypothesis|pyyaml|tqdm|pillow|matplotlib|onnx|onnxscript|onnxruntime)==' requirements-ci.txt)
"$work/venv/bin/python" -m pip install -q --no-deps -r requirements-peers.txt

mkdir -p "$work/src"
git ls-files -z | xargs -0 cp --parents -t "$work/src"
cd "$work/src"
PATH="$work/venv/bin:$cuda_home/bin:$PATH" CUDA_HOME=$cuda_home FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
  MAX_JOBS=$(nproc) "$work/venv/bin/python" setup.py build_ext --inplace >"$work/build.log" 2>&1 ||
  { tail -c 8000 "$work/build.log"; exit 1; }
"$work/venv/bin/python" - <<'EOF'
import torch

import dpm_ops
from dpm_ops.ops._declare import DECLARED

assert torch.version.cuda and dpm_ops.backends()["cpp"][0], dpm_ops.backends()
# a CPU build registers CUDA kernels (Python ones) for 3 of the ops only
missing = [n for n in DECLARED if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dpm_ops::{n}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"torch {torch.__version__}: dpm_ops built, every one of its {len(DECLARED)} ops has a CUDA kernel")
EOF
# a hang (a kernel spinning) fails the step instead of stalling CI
timeout 900 "$work/venv/bin/python" -m pytest -q -n auto -p no:cacheprovider tests/
