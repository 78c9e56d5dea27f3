// Gallery items grouped by pid, and each query's group, built with ATen on the tensors' device
// (shared by the CPU and CUDA entry points of the evaluator).
#pragma once

#include <ATen/ATen.h>

namespace dpm_ops {
namespace rank {

struct PidGroups {
  at::Tensor order;   // gallery indices sorted by (pid, index)
  at::Tensor start;   // (Q,) first position in `order` of the query's pid group
  at::Tensor length;  // (Q,) its size (0 when no gallery item has the pid)

  PidGroups(const at::Tensor& q_pids, const at::Tensor& g_pids) {
    order = g_pids.argsort(/*stable=*/true, /*dim=*/0, /*descending=*/false).contiguous();
    const at::Tensor sorted = g_pids.index_select(0, order);
    start = at::searchsorted(sorted, q_pids).contiguous();
    length = (at::searchsorted(sorted, q_pids, /*out_int32=*/false, /*right=*/true) - start).contiguous();
  }
};

}  // namespace rank
}  // namespace dpm_ops
