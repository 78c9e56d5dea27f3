#!/usr/bin/env bash
# On a GPU machine: build with CUDA, run the tests (CUDA and Triton included) and the benchmarks,
# and write everything to OUT_DIR (default benchmarks/results/<gpu>), ready to commit.
#   scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
out=${1:-benchmarks/results/$gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
{
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$out/environment.txt" 2>&1
FORCE_CUDA=1 python -m pip install --no-build-isolation -v -e . >"$out/build.log" 2>&1 || { echo "build failed"; tail -40 "$out/build.log"; exit 1; }
python -c "import dpm_ops, json; print(json.dumps(dpm_ops.backends(), indent=1))" | tee "$out/backends.json"
python -m pytest -q -ra -p no:cacheprovider 2>&1 | tee "$out/tests.log" || status=1
python -m pytest benchmarks/ -q -m "not slow" --benchmark-json="$out/benchmarks.json" 2>&1 | tee "$out/benchmarks.log" || status=1
exit $status
