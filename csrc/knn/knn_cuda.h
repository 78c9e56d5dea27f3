// Torch-free launchers of the CUDA kernels of the fused distance + top-k (raw pointers, sizes, a
// stream), so nvcc compile-checks them without torch or a GPU. Inputs are contiguous row-major in
// the compute type (kFloat or kDouble); for cosine the rows are already unit vectors.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops {
namespace knn {
namespace cuda {

// For every row of x (M, D): the k smallest (distance, index) pairs over the rows of y (N, D),
// sorted; metric as knn::Metric. Also, when `row_max` is non-null, every row's maximum distance;
// with `self` (x == y) d(i, i) = 0; when `cross` is non-null, rows < cross_rows write their
// distances to columns >= cross_rows into cross (cross_rows, N - cross_rows).
// k <= 32 keeps each row's list in registers (one entry per lane of a warp); larger k in shared
// memory (k <= kMaxSharedK).
void knn(Dtype dtype, const void* x, const void* y, const void* x_norms, const void* y_norms, int64_t M, int64_t N,
         int64_t D, int64_t k, int metric, bool self, void* out_values, int64_t* out_indices, void* row_max,
         void* cross, int64_t cross_rows, cudaStream_t stream);

constexpr int64_t kMaxSharedK = 256;  // 32 lists of k (value, index) pairs in shared memory

}  // namespace cuda
}  // namespace knn
}  // namespace dpm_ops
