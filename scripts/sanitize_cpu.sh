#!/usr/bin/env bash
# The op tests of the C++ backend under AddressSanitizer and UBSan: the C++ CPU kernels compiled with
# DPM_OPS_SANITIZE=1 (dpm_ops/_sources.py), so an out-of-bounds access, a use after free, a signed or
# float-to-int overflow, a bad shift or a misaligned access in a kernel ends the run with a report.
# The sanitized build goes to its own cache (dpm_ops compiles it on import, DPM_OPS_JIT=1): the
# installed dpm_ops/_C stays as it is. About 2.5 min on 2 cores (CI: 131-142 s).
#   scripts/sanitize_cpu.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
export DPM_OPS_SANITIZE=1 DPM_OPS_JIT=1
export DPM_OPS_CACHE_DIR=${DPM_OPS_CACHE_DIR:-${TMPDIR:-/tmp}/dpm_ops_sanitized}
# The runtime first, with the C++ runtime beside it (tests/cuda_emulation/memcheck.sh says why).
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
# No leak report (Python and torch keep memory to the end on purpose); an allocation past the
# sanitizer's 1 TiB limit (tests/test_rerank.py probes for a 4 TiB one) fails as torch's error, as
# without it, instead of ending the process.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# Compiles once, before pytest's workers start, the compiler without the sanitizer's runtime (twice as
# fast); a build that failed (dpm_ops then runs without the C++ backend) or came without the sanitizer
# is an error.
python -c 'import ctypes, os
os.environ.pop("LD_PRELOAD")
import dpm_ops
assert dpm_ops.backends()["cpp"][0], dpm_ops.backends()["cpp"][1]
library = dpm_ops._backend._EXTENSION[0].__file__
assert hasattr(ctypes.CDLL(library), "__asan_report_load1"), f"{library} was built without the sanitizer"'
# The op tests that run the C++ kernels; not their Triton cases (the interpreter, no C++), nor the
# comparisons with fast-reid's jaccard at k1 = 319 (its Python loops: 30 s each, ours 0.3 s; k past the
# items stays covered by test_rerank.py's cap test).
exec python -m pytest -p no:cacheprovider -k "not triton and not 319" "$@" \
  tests/test_knn.py tests/test_knn_certified.py tests/test_knn_properties.py tests/test_kreciprocal_kernels.py \
  tests/test_rerank.py tests/test_jaccard.py tests/test_gnn_rerank.py tests/test_query_expansion.py \
  tests/test_evaluation_rank_distance.py tests/test_roc.py tests/test_ops_evaluation_properties.py \
  tests/test_masked_cosine.py tests/test_masked_arcface.py tests/test_hem_loss.py tests/test_batch_hard_triplet.py \
  tests/test_maskreid_ranking_loss.py tests/test_hierarchical_mask_pool.py \
  tests/test_bad_input_ops.py tests/test_op_declarations.py
