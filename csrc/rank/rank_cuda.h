// Torch-free launchers of the sort-free evaluator's CUDA kernels (raw pointers, sizes, a stream).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/dtype.h"

namespace dpm_ops::rank::cuda {

// Pid groups: members = gallery indices sorted by (pid, index); query q's group is
// members[group_start[q] : group_start[q] + group_length[q]].
// counts[q] = number of matches of query q (same pid, other camera).
void count_matches(const int64_t* members, const int64_t* group_start, const int64_t* group_length,
                   const int64_t* q_cams, const int64_t* g_cams, int64_t Q, int64_t* counts, cudaStream_t stream);

// The ascending ranks of every query's matches into ranks[offsets[q]:offsets[q + 1]]; dist (Q, G)
// in `dtype` (kFloat or kDouble); match_d (total matches, dtype) and match_idx are scratch.
void match_ranks(Dtype dtype, const void* dist, const int64_t* q_pids, const int64_t* g_pids, const int64_t* q_cams,
                 const int64_t* g_cams, int64_t Q, int64_t G, const int64_t* members, const int64_t* group_start,
                 const int64_t* group_length, const int64_t* offsets, void* match_d, int64_t* match_idx,
                 int64_t* ranks, cudaStream_t stream);

}  // namespace dpm_ops::rank::cuda
