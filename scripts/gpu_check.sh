#!/usr/bin/env bash
# GPU bring-up (H100/H200, python3 of a venv with torch + CUDA, triton, ninja, pybind11, pytest,
# pytest-benchmark; no network), in at most 7 minutes: build for sm_90 with every core, the certified k-NN
# benchmarks, the CUDA and Triton tests file by file (each in its own process, with a timeout), the other
# kernel benchmarks, then the whole-model benchmark if time is left. Everything lands in OUT as it comes
# (at most 8 files, summary.txt and summary.json last). --dry-run (CI, CPU): the same steps without the
# build, pytest collection-only. --steps: some of them (environment,build,certified,tests,benchmarks,models).
#   scripts/gpu_check.sh OUT [--dry-run] [--budget SECONDS] [--jobs N] [--steps A,B]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/gpu_check.py "$@"
