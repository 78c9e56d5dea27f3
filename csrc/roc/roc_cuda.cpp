// CUDA entry point of the ROC counts (kernel: roc_kernels.cu): the pairs' buckets, a chunk of queries at
// a time, counted by bincount (the top bucket by a sum). Built only with CUDA.
#include <ATen/ATen.h>

#include <algorithm>

#include "../common/aten_cuda.h"
#include "roc_cuda.h"
#include "roc_table.h"
#include "../common/register_kernels.h"

namespace dpm_ops::roc {
namespace {

constexpr int64_t kChunkPairs = int64_t(1) << 24;  // 128 MB of bucket ids

struct CudaKernels {
  template <typename A> static void count(const rank::MatchInputs& in, const MonotoneBins<A>& map, at::Tensor& buckets);
};

template <typename A>
void CudaKernels::count(const rank::MatchInputs& in, const MonotoneBins<A>& map, at::Tensor& buckets) {
  const int64_t Q = in.dist.size(0), G = in.dist.size(1), num_values = (buckets.size(0) - 2) / 2;
  const int64_t step = std::max<int64_t>(1, kChunkPairs / std::max<int64_t>(G, 1));
  const int64_t top = 2 * num_values;  // the bucket above every match distance: half the pairs or more
  at::Tensor ids = at::empty({std::min(Q, step) * G}, in.q_pids.options());
  at::Tensor below = buckets.narrow(0, 0, top), above = buckets.narrow(0, top, 1);
  at::Tensor nonfinite = at::zeros({1}, in.q_pids.options());
  for (int64_t first = 0; first < Q; first += step) {
    const int64_t rows = std::min(step, Q - first);
    at::Tensor chunk_ids = ids.narrow(0, 0, rows * G);
    cuda::bucket_ids(dtype_of(in.dist), in.dist.narrow(0, first, rows).const_data_ptr(), rows, G,
                     in.q_pids.const_data_ptr<int64_t>() + first, in.g_pids.const_data_ptr<int64_t>(), map.values,
                     num_values, map.bins, map.count, double(map.low), double(map.scale),
                     chunk_ids.data_ptr<int64_t>(), current_stream());
    // the top bucket counted apart: bincount's atomic adds would queue on its one counter
    below.add_(at::bincount(chunk_ids.masked_select(chunk_ids.lt(top)), {}, top));
    above.add_(chunk_ids.eq(top).sum());
    nonfinite.bitwise_or_(chunk_ids.eq(top + 1).any());
  }
  buckets.narrow(0, top + 1, 1).copy_(nonfinite);
}

}  // namespace

DPM_OPS_KERNELS(CUDA, "roc_counts", &roc_counts_op<CudaKernels>)

}  // namespace dpm_ops::roc
