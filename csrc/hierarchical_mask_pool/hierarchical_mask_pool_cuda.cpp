// CUDA entry points of the hierarchical masked pooling: the shared driver with the CUDA passes.
// Built only with CUDA.
#include <c10/cuda/CUDAStream.h>

#include "hierarchical_mask_pool_cuda.h"
#include "hierarchical_mask_pool_driver.h"
#include "../common/aten_cuda.h"
#include "../common/register_kernels.h"

namespace dpm_ops::hierarchical_mask_pool {
namespace {

struct CudaKernels {
  static at::Tensor prepare(const at::Tensor& t) { return t.contiguous(); }

  static void resize_mask(const at::Tensor& mask, const LevelPack& p, at::Tensor& weights, at::Tensor& sums) {
    cuda::resize_mask(dtype_of(mask), mask.const_data_ptr(), mask.size(2), mask.size(3), p, weights.data_ptr(),
                      sums.data_ptr(), current_stream());
  }
  static void pool(const LevelPack& p, const at::Tensor& weights, const at::Tensor& sums, bool max_mode,
                   at::Tensor& out) {
    cuda::pool_forward(dtype_of(out), p, data_or_null(weights), data_or_null(sums), max_mode, out.data_ptr(),
                       current_stream());
  }
  static void pool_backward(const LevelPack& p, const at::Tensor& grad, const at::Tensor& weights,
                            const at::Tensor& sums, const at::Tensor& out, bool max_mode) {
    cuda::pool_backward(dtype_of(grad), p, grad.const_data_ptr(), data_or_null(weights), data_or_null(sums),
                        out.const_data_ptr(), max_mode, current_stream());
  }
};

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "hierarchical_mask_pool", &forward<CudaKernels>,
                "hierarchical_mask_pool_backward", &backward<CudaKernels>)

}  // namespace dpm_ops::hierarchical_mask_pool
