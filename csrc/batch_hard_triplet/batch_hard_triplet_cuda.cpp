// CUDA entry points of the batch-hard soft-margin triplet: the shared driver (cuBLAS Gram GEMM) with
// the CUDA mining and gradient kernels. Built only with CUDA.
#include <c10/cuda/CUDAStream.h>

#include "batch_hard_triplet_cuda.h"
#include "batch_hard_triplet_driver.h"
#include "../common/aten_cuda.h"
#include "../common/register_kernels.h"

namespace dpm_ops::batch_hard_triplet {
namespace {

struct CudaKernels {
  static void mine(const at::Tensor& sq, const at::Tensor& gram, const at::Tensor& labels, Mined& m) {
    cuda::mine(dtype_of(gram), sq.const_data_ptr(), gram.const_data_ptr(), labels.const_data_ptr<int64_t>(),
               gram.size(0), m.pos_index.data_ptr<int64_t>(), m.neg_index.data_ptr<int64_t>(), m.pos_dist.data_ptr(),
               m.neg_dist.data_ptr(), m.live.data_ptr<uint8_t>(), m.row_loss.data_ptr(), current_stream());
  }
  static void gradient(const at::Tensor& x, const Mined& m, int64_t batch, at::Tensor& grad) {
    cuda::gradient(dtype_of(x), x.const_data_ptr(), m.pos_index.const_data_ptr<int64_t>(),
                   m.neg_index.const_data_ptr<int64_t>(), m.pos_dist.const_data_ptr(), m.neg_dist.const_data_ptr(),
                   m.live.const_data_ptr<uint8_t>(), batch, x.size(1), grad.data_ptr(), current_stream());
  }
};

}  // namespace

DPM_OPS_KERNELS(CUDA, "batch_hard_triplet", &batch_hard_triplet_op<CudaKernels>)

}  // namespace dpm_ops::batch_hard_triplet
