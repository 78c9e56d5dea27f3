// Torch-free launchers of the CUDA row passes of the fused masked ArcFace cross-entropy (raw
// pointers, sizes, a stream). The GEMM operands, and the rows' normalisation backward, come from the
// masked cosine's launchers (csrc/masked_cosine/masked_cosine_cuda.h). Inputs are contiguous, fp32/fp64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::masked_arcface::cuda {

struct LossParams {
  double scale, margin, clamp_eps, plain_weight, masked_weight;
  bool easy_margin;
};

// One block per row of the chunk (rows x K): row_loss = masked_w · (lse − l[y]) of the ArcFace logits;
// with `with_grad`, in place num -> g_num, den_sq -> h (masked_cosine_math.h) of dLoss/dcos for a unit
// upstream gradient (`batch`: the B of the mean). Out-of-range labels give NaN (checked before).
void masked_rows(Dtype dtype, void* num, void* den_sq, const int64_t* labels, int64_t rows, int64_t K, int64_t batch,
                 bool with_grad, LossParams p, void* row_loss, cudaStream_t stream);

// One block per row of plain logits: row_loss += plain_w · (lse − plain[y]); with `with_grad`, in
// place plain -> dLoss/dplain.
void plain_rows(Dtype dtype, void* plain, const int64_t* labels, int64_t rows, int64_t K, int64_t batch,
                bool with_grad, LossParams p, void* row_loss, cudaStream_t stream);

}  // namespace dpm_ops::masked_arcface::cuda
