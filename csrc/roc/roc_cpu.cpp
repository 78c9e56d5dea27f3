// CPU kernel of the ROC counts (per-pair logic: roc_math.h): queries in parallel, one pass over each
// row, each thread counting into buckets of its own, summed at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "roc_table.h"
#include "../common/register_kernels.h"

namespace dpm_ops::roc {
namespace {

struct CpuKernels {
  template <typename A> static void count(const rank::MatchInputs& in, const MonotoneBins<A>& map, at::Tensor& buckets);
};

template <typename A>
void CpuKernels::count(const rank::MatchInputs& in, const MonotoneBins<A>& map, at::Tensor& buckets) {
  const int64_t Q = in.dist.size(0), G = in.dist.size(1), size = buckets.size(0);
  const A* dist = in.dist.const_data_ptr<A>();
  const int64_t *q_pids = in.q_pids.const_data_ptr<int64_t>(), *g_pids = in.g_pids.const_data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> per_thread(at::get_num_threads());
  at::parallel_for(0, Q, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t>& counts = per_thread[at::get_thread_num()];
    counts.resize(size);  // zeros on a thread's first chunk
    int64_t* count = counts.data();
    const MonotoneBins<A> bins = map;  // local copies: the counts' stores cannot alias them
    for (int64_t q = begin; q < end; ++q) {
      const A* row = dist + q * G;
      const int64_t q_pid = q_pids[q];
      for (int64_t g = 0; g < G; ++g) {
        if (g + 16 < G) __builtin_prefetch(bins.bins + bin_of(row[g + 16], bins));  // the table is out of cache
        const A d = row[g];
        if (!is_finite(d)) count[size - 1] = 1;
        else if (g_pids[g] != q_pid) ++count[bucket_of(d, bins)];
      }
    }
  });
  int64_t* out = buckets.data_ptr<int64_t>();
  for (const std::vector<int64_t>& counts : per_thread) {
    for (int64_t i = 0; i + 1 < int64_t(counts.size()); ++i) out[i] += counts[i];
    if (!counts.empty()) out[size - 1] |= counts[size - 1];
  }
}

}  // namespace

DPM_OPS_KERNELS(CPU, "roc_counts", &roc_counts_op<CpuKernels>)

}  // namespace dpm_ops::roc
