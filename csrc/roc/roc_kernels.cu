// CUDA kernel of the ROC counts: a thread per pair (grid-stride) writes the pair's bucket (roc_math.h,
// the same code as the CPU kernel); the entry point (roc_cuda.cpp) counts them. No torch headers: see
// roc_cuda.h.
#include <algorithm>

#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "roc_cuda.h"
#include "roc_math.h"

namespace dpm_ops::roc::cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned int kMaxBlocks = 8192;  // a grid-stride loop: enough blocks to fill any GPU

template <typename A>
__global__ void bucket_kernel(const A* dist, int64_t rows, int64_t G, const int64_t* q_pids, const int64_t* g_pids,
                              MonotoneBins<A> map, int64_t num_values, int64_t* ids) {
  const int64_t nonfinite = 2 * num_values + 1, same_pid = 2 * num_values + 2;
  for (int64_t i = thread_index(); i < rows * G; i += thread_count()) {
    const int64_t q = i / G, g = i - q * G;
    const A d = dist[i];
    ids[i] = !is_finite(d) ? nonfinite : (g_pids[g] == q_pids[q] ? same_pid : bucket_of(d, map));
  }
}

}  // namespace

void bucket_ids(Dtype dtype, const void* dist, int64_t rows, int64_t G, const int64_t* q_pids, const int64_t* g_pids,
                const void* values, int64_t num_values, const void* bins, int64_t count, double low,
                double scale, int64_t* ids, cudaStream_t stream) {
  if (rows * G == 0) return;
  const unsigned int blocks = std::min(blocks_for(rows * G, kThreads), kMaxBlocks);
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    const MonotoneBins<A> map{typed<A>(values), typed<Bin<A>>(bins), count, A(low), A(scale)};
    bucket_kernel<A><<<blocks, kThreads, 0, stream>>>(typed<A>(dist), rows, G, q_pids, g_pids, map, num_values, ids);
  });
}

}  // namespace dpm_ops::roc::cuda
