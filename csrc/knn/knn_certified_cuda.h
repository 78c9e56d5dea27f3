// Torch-free launchers of the certified search's two stages on CUDA (backend "cuda"; raw pointers,
// sizes, a stream), so nvcc compile-checks them without torch or a GPU. Stage 1's dot products come
// from cuBLAS (knn_certified_cuda.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::knn::cuda {

// For the rows row0 .. row0 + rows - 1 of x, given their stage-1 dot products with the N rows of y
// (`dots`, (rows, N) fp32: the bf16 GEMM's), the bound's per-row scales (fp32, E = a_i a_j) and the
// squared norms (in the compute type `dtype` names: fp32 or fp64): every row's first `cap` candidate
// columns in ascending order (near, (M, cap) int32, padded with N) and how many there are
// (near_count, (M,) int32). A candidate is a column whose lower bound L = d(s + E) is <= the row's
// k-th smallest upper bound U = d(s - E) (d: the metric's pair_distance; d(i, i) = 0 when `self`).
// When `self`, far / far_count get the same for the columns whose U is >= the row's largest L
// (the columns that may hold the row maximum); else they may be null. Arrays are indexed by the
// global row; k <= kMaxSharedK.
void certified_candidates(Dtype dtype, const float* dots, const float* x_scales, const float* y_scales,
                          const void* x_norms, const void* y_norms, int64_t rows, int64_t row0, int64_t N, int64_t k,
                          int64_t cap, int metric, bool self, int32_t* near, int32_t* near_count, int32_t* far,
                          int32_t* far_count, cudaStream_t stream);

// Stage 2: for each of R rows (rows[r], a row of x), the distances to its first counts[r] candidate
// columns (candidates, (R, C)) as the direct path computes them: pair_distance of a dot product of
// IEEE products and sums in the compute type (the arrays' own, `dtype`: fp32 or fp64), 0 for a row's
// own column when `self`; +inf past the count, into out (R, C). x (M, D), y (N, D), norms (M), (N).
void candidate_distances(Dtype dtype, const void* x, const void* y, const void* x_norms, const void* y_norms,
                         const int64_t* rows, const int64_t* candidates, const int64_t* counts, int64_t R,
                         int64_t C, int64_t D, int metric, bool self, void* out, cudaStream_t stream);

}  // namespace dpm_ops::knn::cuda
