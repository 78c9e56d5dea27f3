// CPU kernel of the sort-free evaluator (per-query logic: rank_math.h): queries in parallel, one
// pass over the gallery per query for the match count and one for the ranks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "rank_groups.h"
#include "rank_math.h"
#include "../common/register_kernels.h"

namespace dpm_ops::rank {
namespace {

struct CpuKernels {
  static std::tuple<at::Tensor, at::Tensor> run(const MatchInputs& in, const PidGroups& groups);
};

std::tuple<at::Tensor, at::Tensor> CpuKernels::run(const MatchInputs& in, const PidGroups& groups) {
  const at::Tensor& dist = in.dist;
  const int64_t Q = dist.size(0), G = dist.size(1);
  const int64_t *qp = in.q_pids.const_data_ptr<int64_t>(), *gp = in.g_pids.const_data_ptr<int64_t>();
  const int64_t *qc = in.q_cams.const_data_ptr<int64_t>(), *gc = in.g_cams.const_data_ptr<int64_t>();
  const int64_t *members = groups.order.const_data_ptr<int64_t>(), *gs = groups.start.const_data_ptr<int64_t>();
  const int64_t* gl = groups.length.const_data_ptr<int64_t>();
  at::Tensor offsets = at::empty({Q + 1}, in.q_pids.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  std::vector<int64_t> counts(Q);
  for (int64_t q = 0; q < Q; ++q) counts[q] = count_matches(members + gs[q], gl[q], gc, qc[q]);
  off[0] = 0;
  for (int64_t q = 0; q < Q; ++q) off[q + 1] = off[q] + counts[q];
  at::Tensor ranks = at::empty({off[Q]}, in.q_pids.options());
  int64_t* rp = ranks.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(dist.scalar_type(), "match_ranks_cpu", [&] {
    const scalar_t* dp = dist.const_data_ptr<scalar_t>();
    at::parallel_for(0, Q, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> match_d;
      std::vector<int64_t> match_idx;
      for (int64_t q = begin; q < end; ++q) {
        const int64_t n = counts[q];
        match_d.resize(n);
        match_idx.resize(n);
        match_ranks(dp + q * G, gp, gc, G, qp[q], qc[q], members + gs[q], gl[q], n, match_d.data(), match_idx.data(),
                    rp + off[q]);
      }
    });
  });
  return {offsets, ranks};
}

}  // namespace

DPM_OPS_KERNELS(CPU, "match_ranks", &match_ranks_op<CpuKernels>)

}  // namespace dpm_ops::rank
