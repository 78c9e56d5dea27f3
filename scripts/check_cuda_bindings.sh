#!/usr/bin/env bash
# Syntax-checks the CUDA entry points (*_cuda.cpp: ATen + c10/cuda) against the installed torch
# headers without a GPU build of torch. The CPU wheel lacks one generated header
# (c10/cuda/impl/cuda_cmake_macros.h); a stand-in is supplied for this check only.
set -euo pipefail
cd "$(dirname "$0")/.."
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
includes=$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
# One g++ per file, as many at once as there are cores (each spends ~20 s parsing torch's headers).
find csrc -name '*_cuda.cpp' | sort | xargs -P "$(nproc)" -I{} sh -c \
  'echo "syntax check: $1"; g++ -fsyntax-only -std=c++17 -w -DDPM_OPS_WITH_CUDA "$@"' _ {} \
  -I"$stub" $includes -I"$cuda_include"
