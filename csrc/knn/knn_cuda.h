// Torch-free launcher of the CUDA selection kernel of the distance + top-k (raw pointers, sizes, a
// stream), so nvcc compile-checks it without torch or a GPU. The dot products come from cuBLAS
// (knn_cuda.cpp); arrays are contiguous row-major in the accumulation type (kFloat or kDouble).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::knn::cuda {

// For the rows row0 .. row0 + rows - 1 of x, given their dot products with the N rows of y
// (`dots`, (rows, N)) and the squared norms of both sets (knn_math.h; unused for cosine): each
// row's k smallest (distance, index) pairs, sorted, into out_values / out_indices (M, k); metric as
// knn::Metric. Also, when `row_max` is non-null, every row's maximum distance; with `self` (x == y)
// d(i, i) = 0; when `cross` is non-null, rows < cross_rows write their distances to columns
// >= cross_rows into cross (cross_rows, N - cross_rows). x_norms, out_*, row_max and cross are
// indexed by the global row. k <= 32 keeps the lists in registers, larger k in shared memory
// (k <= kMaxSharedK).
void select(Dtype dtype, const void* dots, const void* x_norms, const void* y_norms, int64_t rows, int64_t row0,
            int64_t N, int64_t k, int metric, bool self, void* out_values, int64_t* out_indices, void* row_max,
            void* cross, int64_t cross_rows, cudaStream_t stream);

constexpr int64_t kMaxSharedK = 256;  // 8 lists of k (value, index) pairs in shared memory

}  // namespace dpm_ops::knn::cuda
