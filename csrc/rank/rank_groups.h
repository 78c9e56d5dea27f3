// The evaluator's checked inputs, and gallery items grouped by pid with each query's group, built
// with ATen on the tensors' device (shared by the CPU and CUDA entry points of the evaluator).
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <tuple>

#include "../common/compute_type.h"

namespace dpm_ops::rank {

inline void check_labels(const char* op, const at::Tensor& t, int64_t length, const at::Device& device,
                         const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == length && t.scalar_type() == at::kLong, op, ": ", name,
                    " must be a 1-D int64 tensor of length ", length);
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on distmat's device ", device, ", got ",
                    t.device());
}

inline at::Tensor checked_distances(const char* op, const at::Tensor& dist) {
  TORCH_CHECK_VALUE(dist.dim() == 2 && at::isFloatingType(dist.scalar_type()), op,
                    ": distmat must be a 2-D floating tensor");
  return as_compute(dist);
}

// Distances (Q, G) in fp32 or fp64 and contiguous int64 labels, checked for the op `op` (match_ranks,
// roc_counts), which the errors name.
struct MatchInputs {
  at::Tensor dist, q_pids, g_pids, q_cams, g_cams;

  MatchInputs(const char* op, const at::Tensor& dist_in, const at::Tensor& q_pids_in, const at::Tensor& g_pids_in,
              const at::Tensor& q_cams_in, const at::Tensor& g_cams_in)
      : dist(checked_distances(op, dist_in)), q_pids(q_pids_in.contiguous()), g_pids(g_pids_in.contiguous()),
        q_cams(q_cams_in.contiguous()), g_cams(g_cams_in.contiguous()) {
    check_labels(op, q_pids, dist.size(0), dist.device(), "q_pids");
    check_labels(op, q_cams, dist.size(0), dist.device(), "q_camids");
    check_labels(op, g_pids, dist.size(1), dist.device(), "g_pids");
    check_labels(op, g_cams, dist.size(1), dist.device(), "g_camids");
  }
};

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

// The op on any device (the schema's arguments): the checked inputs and their pid groups, then
// Kernels::run(in, groups) -> (offsets (Q + 1), ranks): the ranks of query q's matches,
// ascending, are ranks[offsets[q]:offsets[q + 1]].
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> match_ranks_op(const at::Tensor& dist, const at::Tensor& q_pids,
                                                  const at::Tensor& g_pids, const at::Tensor& q_cams,
                                                  const at::Tensor& g_cams) {
  const MatchInputs in("match_ranks", dist, q_pids, g_pids, q_cams, g_cams);  // checks first: one device
  const c10::OptionalDeviceGuard guard(at::device_of(in.dist));
  return Kernels::run(in, PidGroups(in.q_pids, in.g_pids));
}

}  // namespace dpm_ops::rank
