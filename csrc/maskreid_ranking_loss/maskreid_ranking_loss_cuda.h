// Torch-free launcher of the CUDA kernels of MaskReID's ranking loss (raw pointers, sizes, a stream),
// so nvcc compile-checks them without torch or a GPU. Inputs are contiguous row-major.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"
#include "maskreid_ranking_loss_math.h"

namespace dpm_ops::maskreid_ranking::cuda {

// From the similarity S = X Xᵀ (n × n, `acc` = kFloat or kDouble) and int64 labels: one warp per
// row mines, sums and writes dL/dS; then coef = G + Gᵀ in place and loss[0] = the anchor mean.
// `num_pos` (n int64) and `row_losses` (n acc) are scratch.
void forward(Dtype acc, const void* sim, const int64_t* labels, int64_t n, const Options<double>& options,
             int64_t* num_pos, void* row_losses, void* coef, void* loss, cudaStream_t stream);

}  // namespace dpm_ops::maskreid_ranking::cuda
