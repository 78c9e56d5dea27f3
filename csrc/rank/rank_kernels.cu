// CUDA kernels of the sort-free evaluator: one thread per query runs the per-query logic of
// rank_math.h (the same code as the CPU kernel). No torch headers: see rank_cuda.h.
#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "rank_cuda.h"
#include "rank_math.h"

namespace dpm_ops::rank::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void count_kernel(const int64_t* members, const int64_t* group_start, const int64_t* group_length,
                             const int64_t* q_cams, const int64_t* g_cams, int64_t Q, int64_t* counts) {
  const int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q < Q) counts[q] = rank::count_matches(members + group_start[q], group_length[q], g_cams, q_cams[q]);
}

template <typename A>
__global__ void ranks_kernel(const A* dist, const int64_t* q_pids, const int64_t* g_pids, const int64_t* q_cams,
                             const int64_t* g_cams, int64_t Q, int64_t G, const int64_t* members,
                             const int64_t* group_start, const int64_t* group_length, const int64_t* offsets,
                             A* match_d, int64_t* match_idx, int64_t* ranks) {
  const int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= Q) return;
  const int64_t first = offsets[q];
  rank::match_ranks(dist + q * G, g_pids, g_cams, G, q_pids[q], q_cams[q], members + group_start[q], group_length[q],
                    offsets[q + 1] - first, match_d + first, match_idx + first, ranks + first);
}

}  // namespace

void count_matches(const int64_t* members, const int64_t* group_start, const int64_t* group_length,
                   const int64_t* q_cams, const int64_t* g_cams, int64_t Q, int64_t* counts, cudaStream_t stream) {
  if (Q == 0) return;
  count_kernel<<<blocks_for(Q, kThreads), kThreads, 0, stream>>>(members, group_start, group_length, q_cams, g_cams, Q,
                                                                 counts);
  check_launch();
}

void match_ranks(Dtype dtype, const void* dist, const int64_t* q_pids, const int64_t* g_pids, const int64_t* q_cams,
                 const int64_t* g_cams, int64_t Q, int64_t G, const int64_t* members, const int64_t* group_start,
                 const int64_t* group_length, const int64_t* offsets, void* match_d, int64_t* match_idx,
                 int64_t* ranks, cudaStream_t stream) {
  if (Q == 0) return;
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    ranks_kernel<A><<<blocks_for(Q, kThreads), kThreads, 0, stream>>>(
        typed<A>(dist), q_pids, g_pids, q_cams, g_cams, Q, G, members, group_start, group_length, offsets,
        typed<A>(match_d), match_idx, ranks);
  });
}

}  // namespace dpm_ops::rank::cuda
