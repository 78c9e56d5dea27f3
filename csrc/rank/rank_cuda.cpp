// CUDA entry point of the sort-free evaluator (kernels: rank_kernels.cu). Built only with CUDA.
#include <ATen/ATen.h>

#include "../common/aten_cuda.h"
#include "rank_cuda.h"
#include "rank_groups.h"
#include "../common/register_kernels.h"

namespace dpm_ops::rank {
namespace {

struct CudaKernels {
  static std::tuple<at::Tensor, at::Tensor> run(const MatchInputs& in, const PidGroups& groups);
};

std::tuple<at::Tensor, at::Tensor> CudaKernels::run(const MatchInputs& in, const PidGroups& groups) {
  const at::Tensor &dist = in.dist, &q_pids = in.q_pids;
  const int64_t Q = dist.size(0), G = dist.size(1);
  const cudaStream_t stream = current_stream();
  at::Tensor counts = at::empty({Q}, q_pids.options());
  cuda::count_matches(groups.order.const_data_ptr<int64_t>(), groups.start.const_data_ptr<int64_t>(),
                      groups.length.const_data_ptr<int64_t>(), in.q_cams.const_data_ptr<int64_t>(),
                      in.g_cams.const_data_ptr<int64_t>(), Q, counts.data_ptr<int64_t>(), stream);
  at::Tensor offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)});
  const int64_t total = offsets[Q].item<int64_t>();
  at::Tensor ranks = at::empty({total}, q_pids.options());
  at::Tensor match_d = at::empty({total}, dist.options());
  at::Tensor match_idx = at::empty({total}, q_pids.options());
  cuda::match_ranks(dtype_of(dist), dist.const_data_ptr(), q_pids.const_data_ptr<int64_t>(),
                    in.g_pids.const_data_ptr<int64_t>(), in.q_cams.const_data_ptr<int64_t>(),
                    in.g_cams.const_data_ptr<int64_t>(), Q, G, groups.order.const_data_ptr<int64_t>(),
                    groups.start.const_data_ptr<int64_t>(), groups.length.const_data_ptr<int64_t>(),
                    offsets.const_data_ptr<int64_t>(), match_d.data_ptr(), match_idx.data_ptr<int64_t>(),
                    ranks.data_ptr<int64_t>(), stream);
  return {offsets, ranks};
}

}  // namespace

DPM_OPS_KERNELS(CUDA, "match_ranks", &match_ranks_op<CudaKernels>)

}  // namespace dpm_ops::rank
