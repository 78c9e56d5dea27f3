// Torch-free launchers of the CUDA kernels of DPM's HEM loss (raw pointers, sizes, a stream), so
// nvcc compile-checks them without torch or a GPU. Logits are contiguous (B, heads, N) in `dtype`;
// losses, `grad` and scratch are in `acc` = double for kDouble, float otherwise.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::hem::cuda {

// Shared memory one sample's block needs; the entry point checks it against the device limit.
int64_t shared_bytes(Dtype dtype, int64_t heads);

// One block per sample: per_sample[b] = ‖G_b − I‖²_F / heads², then loss[0] = weight · Σ_b per_sample[b].
void forward(Dtype dtype, const void* logits, int64_t batch, int64_t heads, int64_t n, double eps, double weight,
             void* per_sample, void* loss, cudaStream_t stream);

// One block per sample: grad_logits = the closed-form gradient for the upstream gradient grad[0] · weight.
void backward(Dtype dtype, const void* grad, const void* logits, int64_t batch, int64_t heads, int64_t n, double eps,
              double weight, void* grad_logits, cudaStream_t stream);

}  // namespace dpm_ops::hem::cuda
