// Torch-free launchers of the CUDA kernels of the batch-hard soft-margin triplet (raw pointers,
// sizes, a stream). Inputs are contiguous, fp32 or fp64 (`acc` = the features' type).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::batch_hard_triplet::cuda {

// One block per anchor: distances from the squared norms and the Gram matrix, the hardest positive /
// negative (first index on ties; neg_index -1 without a negative), live flags (B, 2) and softplus.
void mine(Dtype dtype, const void* sq, const void* gram, const int64_t* labels, int64_t B, int64_t* pos_index,
          int64_t* neg_index, void* pos_dist, void* neg_dist, uint8_t* live, void* row_loss, cudaStream_t stream);

// One block per feature row j: the sum of the mined pairs' terms touching it (unit upstream gradient).
void gradient(Dtype dtype, const void* x, const int64_t* pos_index, const int64_t* neg_index, const void* pos_dist,
              const void* neg_dist, const uint8_t* live, int64_t B, int64_t C, void* grad, cudaStream_t stream);

}  // namespace dpm_ops::batch_hard_triplet::cuda
