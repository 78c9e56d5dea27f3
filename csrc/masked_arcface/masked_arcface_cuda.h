// Torch-free launchers of the CUDA row passes of the fused masked ArcFace cross-entropy (raw
// pointers, sizes, a stream). The GEMM operands, and the rows' normalisation backward, come from the
// masked cosine's launchers (csrc/masked_cosine/masked_cosine_cuda.h). Inputs are contiguous, fp32/fp64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops {
namespace masked_arcface {
namespace cuda {

struct LossParams {
  double scale, margin, clamp_eps, plain_weight, masked_weight;
  bool easy_margin;
};

// One block per row of the chunk (rows x K): the rows' masked (and plain, when `plain` is non-null)
// log-sum-exps and weighted CE values. Out-of-range labels give NaN (the caller checks them first).
void forward_rows(Dtype dtype, const void* num, const void* den_sq, const void* plain, const int64_t* labels,
                  int64_t rows, int64_t K, LossParams p, void* masked_lse, void* plain_lse, void* row_loss,
                  cudaStream_t stream);

// In place, per element: num -> g_num, den_sq -> h, plain -> dLoss/dplain; `grad` is the loss's
// upstream gradient (one element, device memory), `batch` the full B of the mean.
void backward_rows(Dtype dtype, const void* grad, void* num, void* den_sq, void* plain, const int64_t* labels,
                   const void* masked_lse, const void* plain_lse, int64_t rows, int64_t K, int64_t batch,
                   LossParams p, cudaStream_t stream);

}  // namespace cuda
}  // namespace masked_arcface
}  // namespace dpm_ops
