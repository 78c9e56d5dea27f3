// Torch-free launcher of the ROC counts' CUDA kernel (raw pointers, sizes, a stream).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::roc::cuda {

// ids[q * G + g] for the `rows` x G distances `dist` (fp32 or fp64, `dtype`, contiguous): the pair's
// bucket (roc_math.h: bucket_of over the num_values distinct match distances `values`, ascending, and
// their table of count + 1 Bin<A> `bins`, A the dtype's) for a non-match (g_pids[g] != q_pids[q]), 2 * num_values + 1 for a NaN or inf,
// 2 * num_values + 2 for the other pairs (same pid).
void bucket_ids(Dtype dtype, const void* dist, int64_t rows, int64_t G, const int64_t* q_pids, const int64_t* g_pids,
                const void* values, int64_t num_values, const void* bins, int64_t count, double low,
                double scale, int64_t* ids, cudaStream_t stream);

}  // namespace dpm_ops::roc::cuda
