// CUDA entry point of MaskReID's ranking loss: S = X Xᵀ (cuBLAS), then the row kernels. Built only with CUDA.
#include <c10/cuda/CUDAGuard.h>

#include "../common/aten_cuda.h"
#include "../common/no_autocast.h"
#include "maskreid_ranking_loss_cuda.h"
#include "maskreid_ranking_loss_driver.h"
#include "../common/register_kernels.h"

namespace dpm_ops::maskreid_ranking {
namespace {

std::tuple<at::Tensor, at::Tensor> maskreid_ranking_loss_cuda(const at::Tensor& embeddings,
                                                              const at::Tensor& labels_in, double alpha, double lam,
                                                              c10::string_view neg_mode, c10::string_view pos_mode) {
  const NoAutocastGuard no_autocast;
  check_inputs(embeddings, labels_in);
  const Options<double> o = parse_options(alpha, lam, std::string(neg_mode), std::string(pos_mode));
  const c10::cuda::CUDAGuard guard(embeddings.device());
  const at::Tensor x = as_compute(embeddings);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = x.size(0);
  const at::Tensor sim = at::mm(x, x.t()).contiguous();
  at::Tensor coef = at::empty({n, n}, x.options()), loss = at::empty({}, x.options());
  at::Tensor row_losses = at::empty({n}, x.options()), num_pos = at::empty({n}, labels.options());
  cuda::forward(dtype_of(x), sim.const_data_ptr(),
                labels.const_data_ptr<int64_t>(), n, o, num_pos.data_ptr<int64_t>(), row_losses.data_ptr(),
                coef.data_ptr(), loss.data_ptr(), current_stream());
  return {loss, coef};
}

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "maskreid_ranking_loss", &maskreid_ranking_loss_cuda,
                "maskreid_ranking_loss_backward", &backward)

}  // namespace dpm_ops::maskreid_ranking
