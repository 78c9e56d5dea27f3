// Torch-free launchers of the CUDA kernels of the masked cosine (raw pointers, sizes, a stream),
// so nvcc compile-checks them without torch or a GPU. Inputs are contiguous row-major.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::masked_cosine::cuda {

// Accumulators, inverse norms and coefficients are `acc` = double for kDouble, float otherwise.

// inv[r] = 1/max(||v_r||, eps) and the GEMM operands, in `operand` (`dtype` or `acc`):
// scaled = v*inv*mult, second = mult^2 (or scaled = v*inv, second = scaled^2 without mult).
void prepare_rows(Dtype dtype, Dtype operand, const void* v, const void* mult, int64_t rows, int64_t cols,
                  double eps, void* scaled, void* second, void* inv, cudaStream_t stream);

// In place over n elements of `acc` (kFloat or kDouble): num = num / max(sqrt(den_sq), eps).
void cosine_epilogue(Dtype acc, void* num, const void* den_sq, int64_t n, double eps, cudaStream_t stream);

// g_num = g / max(den, eps), h = g*C/den^2 (0 where den <= eps); all n-element arrays in `acc`.
void backward_coefs(Dtype acc, const void* grad, const void* out, const void* den_sq, int64_t n, double eps,
                    void* g_num, void* h, cudaStream_t stream);

// grad_x (through the normalisation) and grad_mask from u = G_num Ph and v = H Ph^2.
void query_rows_backward(Dtype dtype, const void* x, const void* mask, const void* inv, const void* u,
                         const void* v, int64_t rows, int64_t cols, double eps, void* grad_x, void* grad_mask,
                         cudaStream_t stream);

// grad_protos (through the normalisation) from up = G_num^T (Xh*M) and vp = H^T M^2.
void proto_rows_backward(Dtype dtype, const void* protos, const void* inv, const void* up, const void* vp,
                         int64_t rows, int64_t cols, double eps, void* grad_protos, cudaStream_t stream);

}  // namespace dpm_ops::masked_cosine::cuda
