#!/usr/bin/env bash
# The emulated CUDA tests (tests/test_emulated_kernels.py) under AddressSanitizer, the CPU's stand-in
# for compute-sanitizer's memcheck: the emulator builds its library with it and with the checks of
# undefined behaviour (emulate.sanitized()), so an out-of-bounds access to global or shared memory, a
# signed overflow or a misaligned access by any kernel or entry point ends the run with a report.
# With DPM_OPS_EMULATED_CUDA=1, the op tests of backend "cuda" on the emulated CUDA code instead (the
# CI step's selection; about 11 min on 2 cores).
#   [DPM_OPS_EMULATED_CUDA=1] tests/cuda_emulation/memcheck.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
# The runtime first, with the C++ runtime beside it: AddressSanitizer takes the __cxa_throw it wraps
# from the libraries loaded when it starts (python itself does not load libstdc++).
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
# Python and torch keep memory to the end on purpose: no leak report.
export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
PYTHONPATH=tests python -c 'import sys; from cuda_emulation import emulate
emulate.sanitized() or sys.exit("memcheck.sh: no sanitizer loaded")'
if [[ "${DPM_OPS_EMULATED_CUDA:-}" == 1 ]]; then
  exec python -m pytest -k cuda tests/ --ignore tests/test_emulated_kernels.py -p no:cacheprovider "$@"
fi
exec python -m pytest tests/test_emulated_kernels.py -p no:cacheprovider "$@"
