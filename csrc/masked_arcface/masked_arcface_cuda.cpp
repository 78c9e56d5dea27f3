// CUDA entry points of the fused masked ArcFace cross-entropy: the shared chunked driver with cuBLAS
// GEMMs, this op's row passes, and the masked cosine's CUDA row kernels. Built only with CUDA.
#include <c10/cuda/CUDAStream.h>

#include "../masked_cosine/masked_cosine_cuda.h"
#include "masked_arcface_cuda.h"
#include "masked_arcface_driver.h"
#include "../common/aten_cuda.h"
#include "../common/register_kernels.h"

namespace dpm_ops::masked_arcface {
namespace {

cuda::LossParams loss_params(const Params& p) {
  return {p.scale, p.margin, p.clamp_eps, p.plain_weight, p.masked_weight, p.easy_margin};
}

struct CudaKernels {
  // features are fp32 / fp64 (checked): fp32 operands follow the float32 matmul precision
  // (TF32 tensor cores under "high" / "medium"), and the row passes read fp32 products.
  static constexpr auto operand_type = masked_cosine::accumulation_operands;

  static void prepare_rows(const at::Tensor& v, const at::Tensor& mult, double eps, at::Tensor& scaled,
                           at::Tensor& second, at::Tensor& inv) {
    masked_cosine::cuda::prepare_rows(dtype_of(v), dtype_of(scaled), v.const_data_ptr(), data_or_null(mult),
                                      v.size(0), v.size(1), eps, scaled.data_ptr(), second.data_ptr(), inv.data_ptr(),
                                      current_stream());
  }
  // The row kernels give a label outside [0, K) a NaN row: a direct torch.ops call gets the CPU op's ValueError
  // instead, for one sync (the Python entry point leaves this check to the op).
  static void check_labels(const at::Tensor& labels, int64_t K) {
    if (labels.numel() == 0) return;
    const auto [low, high] = at::aminmax(labels);
    const at::Tensor range = at::stack({low, high}).cpu();
    const int64_t* bounds = range.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(bounds[0] >= 0 && bounds[1] < K, "masked_arcface_cross_entropy: labels must lie in [0, K = ", K,
                      ")");
  }
  static void masked_rows(at::Tensor num, at::Tensor den_sq, const at::Tensor& labels, const Params& p,
                          int64_t batch, bool with_grad, at::Tensor row_loss) {
    cuda::masked_rows(dtype_of(num), num.data_ptr(), den_sq.data_ptr(), labels.const_data_ptr<int64_t>(),
                      num.size(0), num.size(1), batch, with_grad, loss_params(p), row_loss.data_ptr(),
                      current_stream());
  }
  static void plain_rows(at::Tensor plain, const at::Tensor& labels, const Params& p, int64_t batch, bool with_grad,
                         at::Tensor row_loss) {
    cuda::plain_rows(dtype_of(plain), plain.data_ptr(), labels.const_data_ptr<int64_t>(), plain.size(0),
                     plain.size(1), batch, with_grad, loss_params(p), row_loss.data_ptr(), current_stream());
  }
  static void query_rows_backward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& inv,
                                  const at::Tensor& u, const at::Tensor& v, const at::Tensor& plain_grad,
                                  at::Tensor& grad_x, at::Tensor& grad_mask) {
    masked_cosine::cuda::query_rows_backward(dtype_of(x), x.const_data_ptr(), mask.const_data_ptr(),
                                             inv.const_data_ptr(), u.const_data_ptr(), v.const_data_ptr(), x.size(0),
                                             x.size(1), kEps, grad_x.data_ptr(), grad_mask.data_ptr(),
                                             current_stream());
    if (plain_grad.defined()) grad_x.add_(plain_grad);
  }
  static void proto_rows_backward(const at::Tensor& protos, const at::Tensor& inv, const at::Tensor& up,
                                  const at::Tensor& vp, const at::Tensor& plain_grad, at::Tensor& grad_protos) {
    masked_cosine::cuda::proto_rows_backward(dtype_of(protos), protos.const_data_ptr(), inv.const_data_ptr(),
                                             up.const_data_ptr(), vp.const_data_ptr(), protos.size(0), protos.size(1),
                                             kEps, grad_protos.data_ptr(), current_stream());
    if (plain_grad.defined()) grad_protos.add_(plain_grad);
  }
};

}  // namespace

DPM_OPS_KERNELS(CUDA, "masked_arcface_ce", &masked_arcface_ce<CudaKernels>)

}  // namespace dpm_ops::masked_arcface
