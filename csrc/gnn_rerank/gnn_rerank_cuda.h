// Torch-free launchers of the GNN re-ranking stages' CUDA kernels (raw pointers, sizes, a stream).
// The propagated rows are a ragged output, built in two passes as the k-reciprocal stages' are
// (../kreciprocal/kreciprocal_cuda.h): a count pass writes each row's size, the caller turns the
// sizes into row_ptr (exclusive scan) and allocates, and a fill pass writes the rows in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kreciprocal/kreciprocal_cuda.h"

namespace dpm_ops::gnn_rerank::cuda {

// The row kernels' per-thread scratch (scratch_threads(rows) * slots per thread) and the similarity
// kernel's dots (query_gallery_scratch(Q, G) floats) are sized as the k-reciprocal kernels' are.
using kreciprocal::cuda::query_gallery_scratch;
using kreciprocal::cuda::scratch_threads;

// Propagation over A (CSR row_ptr, cols, values), its transpose A^T (t_ptr, t_cols, t_values) and
// sources / weights (N, k2): count pass (sizes) and fill pass (out_cols / out_values at out_row_ptr,
// each row divided by its L2 norm). scratch: 4 * k2 slots per thread.
void propagate_count(const int64_t* row_ptr, const int64_t* cols, const int64_t* t_ptr, const int64_t* t_cols,
                     const int64_t* sources, int64_t N, int64_t k2, int64_t* scratch, int64_t* sizes,
                     cudaStream_t stream);
void propagate_fill(const int64_t* row_ptr, const int64_t* cols, const float* values, const int64_t* t_ptr,
                    const int64_t* t_cols, const float* t_values, const int64_t* sources, const float* weights,
                    int64_t N, int64_t k2, int64_t* scratch, const int64_t* out_row_ptr, int64_t* out_cols,
                    float* out_values, cudaStream_t stream);

// out (Q, G) float32 holds cos(q, g), overwritten by the blend of <A_q, A_{Q+g}> and it. Query rows:
// the CSR (row_ptr, cols, values) rows 0..Q-1; gallery rows through the inverted index: column c's
// holders (gallery row g, value) at holder / holder_value[column_start[c]:column_start[c + 1]]. dots
// scratch: query_gallery_scratch(Q, G) floats, zeroed by the caller (the kernel leaves it zeroed).
void similarity(float* out, int64_t Q, int64_t G, const int64_t* row_ptr, const int64_t* cols, const float* values,
                const int64_t* column_start, const int64_t* holder, const float* holder_value,
                float propagated_weight, float cosine_weight, float* dots, cudaStream_t stream);

}  // namespace dpm_ops::gnn_rerank::cuda
