// CUDA kernels of the certified search's two stages (backend "cuda"; docs/certified_knn.md, "GPU").
// No torch headers: see knn_certified_cuda.h.
//
// Stage 1 (candidates_kernel):
// cuBLAS's bf16 GEMM (fp32 accumulation and output) gives a block of rows' dot products s; this
// kernel turns each row into its candidate buffers and writes no bound: one thread block per row
// reads its line of s twice.
//   pass 1: U = d(s - E) of every column into the warps' lists (knn_select.cuh), merged into the
//           row's k-th smallest U; with self pairs also the row's largest L = d(s + E);
//   pass 2: the columns with L <= that U, and with self pairs those with U >= the largest L, in
//           ascending order, 256 columns a step: each warp's ballot numbers its lanes' columns,
//           the warps' counts of both kinds go through shared memory (one __syncthreads a step),
//           and every column below `cap` is written to its slot. Past the last one the buffers
//           hold N.
// L and U are the torch version's (ops/knn_certified.py, _stage1_torch) in the same operations:
// s and E = (a_i a_j in fp32) widened to the compute type, then pair_distance(s +- E). Pass 1's and
// pass 2's values are the same computation, so a column is a candidate exactly when its L is <= the
// k-th U that pass 1 selected.
//
// Stage 2 (candidate_distances_kernel): one thread block per row; each warp takes every kWarps-th
// candidate of the row and its lanes sum the products of an interleaved share of the features
// (coalesced reads of the candidate's row), then combine their sums. Only the row's counted
// candidates are read: about count x D values a row, where a gathered (rows, widest count, D)
// block would be written and read again.
#include <cuda_runtime.h>

#include <stdexcept>

#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "knn_certified_cuda.h"
#include "knn_cuda.h"
#include "knn_math.h"
#include "knn_select.cuh"

namespace dpm_ops::knn::cuda {
namespace {

// Stage 1's bounds of column `col` of row `row`.
template <typename A> struct Bounds {
  A lower, upper;

  __device__ __forceinline__ Bounds(const float* line, float x_scale, const float* y_scales, A x_norm,
                                    const A* y_norms, int64_t row, int64_t col, Metric metric, bool self) {
    if (self && col == row) {
      lower = upper = A(0);
      return;
    }
    // __fmul_rn: E rounded on its own, as torch does, never fused into s +- E by an FMA.
    const A s = A(line[col]), e = A(__fmul_rn(x_scale, y_scales[col]));
    lower = pair_distance(s + e, x_norm, y_norms[col], metric);
    upper = pair_distance(s - e, x_norm, y_norms[col], metric);
  }
};

// One step's flagged columns, numbered in column order across the block. The constructor
// publishes the warp's count in `counts` (a kWarps slot of shared memory); after a __syncthreads,
// slot() is this thread's column's place: the flagged columns of earlier steps (`total`, which grows
// by this step's in every thread) and of lower threads.
struct Flagged {
  unsigned ballot;

  __device__ __forceinline__ Flagged(bool flag, int* counts) : ballot(__ballot_sync(kFull, flag)) {
    if (threadIdx.x % 32 == 0) counts[threadIdx.x / 32] = __popc(ballot);
  }

  __device__ __forceinline__ int slot(const int* counts, int& total) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int before = total + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? counts[w] : 0;
      total += counts[w];
    }
    return before;
  }
};

template <typename A, bool kRegisters>
__global__ void __launch_bounds__(kThreads)
candidates_kernel(const float* __restrict__ dots, const float* __restrict__ x_scales,
                  const float* __restrict__ y_scales, const A* __restrict__ x_norms, const A* __restrict__ y_norms,
                  int64_t row0, int64_t N, int k, int cap, Metric metric, bool self, int32_t* __restrict__ near,
                  int32_t* __restrict__ near_count, int32_t* __restrict__ far, int32_t* __restrict__ far_count) {
  __shared__ A kth_upper;
  __shared__ int counts[2][2][kWarps];  // [step parity][near, far][warp]
  extern __shared__ __align__(16) unsigned char list_storage[];  // k > 32: kWarps lists of k pairs
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = row0 + blockIdx.x;
  const float* line = dots + int64_t(blockIdx.x) * N;
  const float x_scale = x_scales[row];
  const A x_norm = x_norms[row];

  // Pass 1: the k-th smallest U (the index only orders equal values) and the largest L.
  RowSelect<A, kRegisters> select(k, list_storage);
  A top_lower = -infinity<A>();
  select.offer_row(N, [&](int64_t col) {
    const Bounds<A> b(line, x_scale, y_scales, x_norm, y_norms, row, col, metric, self);
    top_lower = max_of(top_lower, b.lower);
    return b.upper;
  });
  if (self) top_lower = block_combine(top_lower, [](A a, A b) { return max_of(a, b); });
  select.merge();
  if (warp == 0) {
    A value;
    int64_t index;
    select.kth(value, index);
    if (lane == 0) kth_upper = value;
  }
  __syncthreads();
  const A limit = kth_upper;

  // Pass 2: the candidates in column order.
  int near_total = 0, far_total = 0;
  int32_t* near_row = near + row * cap;
  int32_t* far_row = self ? far + row * cap : nullptr;
  for (int64_t base = 0, step = 0; base < N; base += kThreads, ++step) {
    const int64_t col = base + threadIdx.x;
    bool is_near = false, is_far = false;
    if (col < N) {
      const Bounds<A> b(line, x_scale, y_scales, x_norm, y_norms, row, col, metric, self);
      is_near = b.lower <= limit;
      is_far = self && b.upper >= top_lower;
    }
    // Both kinds counted across one __syncthreads; `counts` alternates between steps, so that a
    // step's counts are not overwritten while a slower thread still reads the previous step's.
    int (*step_counts)[kWarps] = counts[step % 2];
    const Flagged near_flags(is_near, step_counts[0]), far_flags(is_far, step_counts[1]);
    __syncthreads();
    const int near_slot = near_flags.slot(step_counts[0], near_total);
    if (is_near && near_slot < cap) near_row[near_slot] = int32_t(col);
    const int far_slot = far_flags.slot(step_counts[1], far_total);  // 0 flagged without self pairs
    if (is_far && far_slot < cap) far_row[far_slot] = int32_t(col);
  }
  for (int p = min(near_total, cap) + threadIdx.x; p < cap; p += kThreads) near_row[p] = int32_t(N);
  if (self)
    for (int p = min(far_total, cap) + threadIdx.x; p < cap; p += kThreads) far_row[p] = int32_t(N);
  if (threadIdx.x == 0) {
    near_count[row] = near_total;
    if (self) far_count[row] = far_total;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
candidate_distances_kernel(const A* __restrict__ x, const A* __restrict__ y, const A* __restrict__ x_norms,
                           const A* __restrict__ y_norms, const int64_t* __restrict__ rows,
                           const int64_t* __restrict__ candidates, const int64_t* __restrict__ counts, int64_t C,
                           int64_t D, Metric metric, bool self, A* __restrict__ out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = blockIdx.x, row = rows[r], count = min(counts[r], C);
  const A* x_row = x + row * D;
  const int64_t* columns = candidates + r * C;
  A* out_row = out + r * C;
  for (int64_t j = warp; j < count; j += kWarps) {
    const int64_t col = columns[j];
    const A* y_row = y + col * D;
    A dot = A(0);
    for (int64_t t = lane; t < D; t += 32) dot += x_row[t] * y_row[t];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFull, dot, offset);
    if (lane == 0) out_row[j] = (self && col == row) ? A(0) : pair_distance(dot, x_norms[row], y_norms[col], metric);
  }
  for (int64_t j = count + threadIdx.x; j < C; j += kThreads) out_row[j] = infinity<A>();
}

}  // namespace

void certified_candidates(Dtype dtype, const float* dots, const float* x_scales, const float* y_scales,
                          const void* x_norms, const void* y_norms, int64_t rows, int64_t row0, int64_t N, int64_t k,
                          int64_t cap, int metric, bool self, int32_t* near, int32_t* near_count, int32_t* far,
                          int32_t* far_count, cudaStream_t stream) {
  if (rows == 0) return;
  if (k > kMaxSharedK) throw std::runtime_error("dpm_ops knn_certified: the CUDA stage 1 takes k <= 256");
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    launch_row_select<A>(candidates_kernel<A, true>, candidates_kernel<A, false>, k, rows, stream,
                         "knn_certified candidates_kernel", dots, x_scales, y_scales, typed<A>(x_norms),
                         typed<A>(y_norms), row0, N, int(k), int(cap), Metric(metric), self, near, near_count, far,
                         far_count);
  });
}

void candidate_distances(Dtype dtype, const void* x, const void* y, const void* x_norms, const void* y_norms,
                         const int64_t* rows, const int64_t* candidates, const int64_t* counts, int64_t R,
                         int64_t C, int64_t D, int metric, bool self, void* out, cudaStream_t stream) {
  if (R == 0 || C == 0) return;
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    candidate_distances_kernel<A><<<static_cast<unsigned int>(R), kThreads, 0, stream>>>(
        typed<A>(x), typed<A>(y), typed<A>(x_norms), typed<A>(y_norms), rows, candidates, counts, C, D,
        Metric(metric), self, typed<A>(out));
  });
}

}  // namespace dpm_ops::knn::cuda
