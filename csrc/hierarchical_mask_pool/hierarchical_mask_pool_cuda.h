// Torch-free launchers of the CUDA kernels of the hierarchical masked pooling (raw pointers in a
// LevelPack, a stream), so nvcc compile-checks them without torch or a GPU. Inputs are contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"
#include "hierarchical_mask_pool_math.h"

namespace dpm_ops::hierarchical_mask_pool::cuda {

// Weights and sums are `acc` = double for kDouble, float otherwise; features, out, grad in `dtype`.

// The mask (B, 1, H, W) resized to every level: weights (B, total_hw), sums (B, count). One launch.
void resize_mask(Dtype dtype, const void* mask, int64_t H, int64_t W, const LevelPack& pack, void* weights,
                 void* sums, cudaStream_t stream);

// out (B, total_channels): every row of every level in one launch (weights/sums null: no mask).
void pool_forward(Dtype dtype, const LevelPack& pack, const void* weights, const void* sums, bool max_mode,
                  void* out, cudaStream_t stream);

// Writes each level's gradient into pack.level[l].grad, in one launch.
void pool_backward(Dtype dtype, const LevelPack& pack, const void* grad, const void* weights, const void* sums,
                   const void* out, bool max_mode, cudaStream_t stream);

}  // namespace dpm_ops::hierarchical_mask_pool::cuda
