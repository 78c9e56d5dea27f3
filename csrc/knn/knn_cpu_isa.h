// The certified search's choice of instruction set, shared by its stage-1 loops
// (knn_certified_stage1_cpu.h), its stage 2 (knn_certified_cpu.cpp) and the AMX int8 GEMM
// (knn_int8_gemm_amx.h).
//
// The per-element loops come in two builds, chosen at run time: *_avx512 for CPUs with AVX-512 (16
// fp32 lanes, FMA, a rounding instruction) and *_portable (the build's own target, SSE2 on x86-64: a
// quarter as wide). They must stay small beside the int8 GEMM that feeds them. The choice is torch's
// own CPU capability (at::get_cpu_capability), so ATEN_CPU_CAPABILITY=default or avx2 keeps the
// portable build, as for torch's kernels (which is how the tests check it on an AVX-512 machine).
#pragma once

#include <ATen/ATen.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DPM_OPS_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#else
#define DPM_OPS_AVX512_TARGET
#endif

namespace dpm_ops::knn {

inline bool has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = at::get_cpu_capability() == "AVX512";
  return avx512;
#else
  return false;
#endif
}

}  // namespace dpm_ops::knn
