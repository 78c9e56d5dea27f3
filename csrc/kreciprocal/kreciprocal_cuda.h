// Torch-free launchers of the k-reciprocal stages' CUDA kernels (raw pointers, sizes, a stream).
// Ragged outputs are built in two passes: a count pass writes each row's size, the caller turns
// the sizes into row_ptr (exclusive scan) and allocates, and a fill pass writes the rows in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::kreciprocal::cuda {

// Row kernels that need per-row scratch run at most this many threads (grid-stride over the
// rows); a scratch buffer holds scratch_threads(rows) * (slots per thread) elements.
constexpr int64_t kMaxScratchThreads = int64_t(1) << 15;
inline int64_t scratch_threads(int64_t rows) { return rows < kMaxScratchThreads ? rows : kMaxScratchThreads; }

// R(c, kh) of every item: half_sets (N, count_h), half_sizes (N).
void half_sets(const int64_t* neighbours, int64_t N, int64_t width, int64_t count_h, int64_t* half_sets,
               int64_t* half_sizes, cudaStream_t stream);

// Count pass of R*: sizes[i] = |R*(i)|. scratch: count1 * (count_h + 2) slots per thread.
void expand_count(const int64_t* neighbours, int64_t N, int64_t width, int64_t count1, int64_t count_h,
                  const int64_t* half_sets, const int64_t* half_sizes, int64_t* scratch, int64_t* sizes,
                  cudaStream_t stream);

// Fill pass of R*: cols[row_ptr[i]:row_ptr[i + 1]] = R*(i), ascending. scratch: count1 slots per thread.
void expand_fill(const int64_t* neighbours, int64_t N, int64_t width, int64_t count1, int64_t count_h,
                 const int64_t* half_sets, const int64_t* half_sizes, int64_t* scratch, const int64_t* row_ptr,
                 int64_t* cols, cudaStream_t stream);

// out[e] = squared distance of CSR entry e (row of e, cols[e]); features (N, D) in `dtype` (kFloat
// or kDouble), candidate lists (N, m). One thread per entry.
void pair_sqdist(Dtype dtype, const void* features, int64_t N, int64_t D, const float* cand_values,
                 const int64_t* cand_indices, int64_t m, const int64_t* row_ptr, const int64_t* cols, int64_t nnz,
                 float* out, cudaStream_t stream);

// Query expansion over sources (N, k2): count pass (sizes) and fill pass (out_cols / out_values at
// out_row_ptr). scratch: 2 * k2 slots per thread.
void query_expansion_count(const int64_t* row_ptr, const int64_t* cols, const int64_t* sources, int64_t N,
                           int64_t k2, int64_t* scratch, int64_t* sizes, cudaStream_t stream);
void query_expansion_fill(const int64_t* row_ptr, const int64_t* cols, const float* values, const int64_t* sources,
                          int64_t N, int64_t k2, int64_t* scratch, const int64_t* out_row_ptr, int64_t* out_cols,
                          float* out_values, cudaStream_t stream);

// The query x gallery sums kernel of the Jaccard stage and of GNN re-ranking's similarity
// (query_gallery_sums.cuh): its blocks, and the global scratch its sums take, zeroed by the caller: none
// where a block's G sums fit in the kMaxSharedSums floats of shared memory it asks for (96 KB: what sm_80
// and sm_90 both grant a block), else query_gallery_blocks(Q) * G floats.
constexpr int64_t kMaxQueryGalleryBlocks = 512;
constexpr int64_t kMaxSharedSums = 24576;
inline int64_t query_gallery_blocks(int64_t Q) { return Q < kMaxQueryGalleryBlocks ? Q : kMaxQueryGalleryBlocks; }
inline int64_t query_gallery_scratch(int64_t Q, int64_t G) {
  return G <= kMaxSharedSums ? 0 : query_gallery_blocks(Q) * G;
}

// out (Q, G) float32: the normalised query-gallery distance (divided here by row_scale[q] when
// row_scale is not null), overwritten by the blend. Query rows: the CSR (row_ptr, cols, values)
// rows 0..Q-1; gallery rows through the inverted index: column c's holders (gallery row g, value)
// at holder / holder_value[column_start[c]:column_start[c + 1]]. overlap: query_gallery_scratch(Q, G) floats.
void jaccard_blend(float* out, int64_t Q, int64_t G, const int64_t* row_ptr, const int64_t* cols, const float* values,
                   const int64_t* column_start, const int64_t* holder, const float* holder_value,
                   const float* row_scale, float jaccard_weight, float keep, float* overlap, cudaStream_t stream);

}  // namespace dpm_ops::kreciprocal::cuda
