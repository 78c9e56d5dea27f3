// CUDA selection kernel of the distance + top-k. No torch headers: see knn_cuda.h.
//
// The dot products come from cuBLAS (knn_cuda.cpp, common/gemm.h), a block of rows at a time; this
// kernel turns one block into distances (knn_math.h) and selects every row's k smallest
// (distance, index) pairs. One thread block per row: each of its kWarps warps scans an interleaved
// share of the row's columns into its own sorted list, as in faiss's WarpSelect (a lane's value
// enters only if it beats the list's current k-th pair: one ballot per 32 columns; each entering
// value is inserted by the whole warp at once); warp 0 then merges the other warps' lists into its
// own the same way.
// k <= 32: a list lives in registers, lane l holding the l-th smallest pair; an insertion at p is
// one ballot (p = number of smaller pairs) and one shuffle up. k > 32: the lists live in shared
// memory and each warp shifts its own cooperatively.
#include <cuda_runtime.h>

#include <cfloat>
#include <stdexcept>
#include <string>

#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "knn_cuda.h"
#include "knn_math.h"

namespace dpm_ops::knn::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kNoIndex = INT64_MAX;

template <typename A> __device__ __forceinline__ A infinity();
template <> __device__ __forceinline__ float infinity<float>() { return FLT_MAX * 2.f; }
template <> __device__ __forceinline__ double infinity<double>() { return DBL_MAX * 2.0; }

// Register list (k <= 32): lane l holds the l-th smallest pair of its warp's share of the row.
template <typename A> struct WarpList {
  A value;
  int64_t index;

  __device__ void reset() {
    value = infinity<A>();
    index = kNoIndex;
  }
  // The k-th smallest pair, on every lane.
  __device__ void kth(int k, A& v, int64_t& i) const {
    v = __shfl_sync(kFull, value, k - 1);
    i = __shfl_sync(kFull, index, k - 1);
  }
  // Inserts (v, i) (the same on every lane), known to beat the k-th pair.
  __device__ __forceinline__ void insert(A v, int64_t i) {
    const int lane = threadIdx.x % 32;
    const int position = __popc(__ballot_sync(kFull, pair_less(value, index, v, i)));
    const A up_value = __shfl_up_sync(kFull, value, 1);
    const int64_t up_index = __shfl_up_sync(kFull, index, 1);
    if (lane == position) {
      value = v;
      index = i;
    } else if (lane > position) {
      value = up_value;
      index = up_index;
    }
  }
};

// Shared-memory list (any k <= kMaxSharedK), kept sorted by its warp.
template <typename A> struct SharedList {
  A* values;
  int64_t* indices;
  int k;

  __device__ void reset() {
    for (int p = threadIdx.x % 32; p < k; p += 32) {
      values[p] = infinity<A>();
      indices[p] = kNoIndex;
    }
    __syncwarp();
  }
  __device__ void kth(int, A& v, int64_t& i) const {
    v = values[k - 1];
    i = indices[k - 1];
  }
  __device__ __forceinline__ void insert(A v, int64_t i) {
    const int lane = threadIdx.x % 32;
    int position = 0;
    for (int base = 0; base < k; base += 32) {
      const int p = base + lane;
      position += __popc(__ballot_sync(kFull, p < k && pair_less(values[p], indices[p], v, i)));
    }
    // Shift [position, k - 1) up by one: read everything first, then write. (Unrolling this loop
    // makes ptxas spill the fp64 instantiation.)
#pragma unroll 1
    for (int base = k - 1; base > position; base -= 32) {
      const int p = base - lane;
      const bool moves = p > position;
      A moved_value = moves ? values[p - 1] : A(0);
      int64_t moved_index = moves ? indices[p - 1] : 0;
      __syncwarp();
      if (moves) {
        values[p] = moved_value;
        indices[p] = moved_index;
      }
      __syncwarp();
    }
    if (lane == 0) {
      values[position] = v;
      indices[position] = i;
    }
    __syncwarp();
  }
};

// Offers one pair per lane (where `valid`) to the warp's list: one ballot, then the entering pairs
// one at a time (re-checked against the k-th pair, which each insertion lowers).
template <typename A, typename List>
__device__ __forceinline__ void offer(List& list, int k, A v, int64_t i, bool valid) {
  A kth_v;
  int64_t kth_i;
  list.kth(k, kth_v, kth_i);
  unsigned pending = __ballot_sync(kFull, valid && pair_less(v, i, kth_v, kth_i));
  while (pending) {
    const int source = __ffs(pending) - 1;
    pending &= pending - 1;
    const A cv = __shfl_sync(kFull, v, source);
    const int64_t ci = __shfl_sync(kFull, i, source);
    list.kth(k, kth_v, kth_i);
    if (pair_less(cv, ci, kth_v, kth_i)) list.insert(cv, ci);
  }
}

// Row `row0 + blockIdx.x`: dots (its line of the block) -> distances -> the k smallest pairs, the
// row maximum and its cross-block entries.
template <typename A, bool kRegisters>
__global__ void __launch_bounds__(kThreads)
select_kernel(const A* __restrict__ dots, const A* __restrict__ x_norms, const A* __restrict__ y_norms,
              int64_t row0, int64_t N, int k, Metric metric, bool self, A* __restrict__ out_values,
              int64_t* __restrict__ out_indices, A* __restrict__ row_max, A* __restrict__ cross,
              int64_t cross_rows) {
  __shared__ A stage_values[kWarps][32];     // k <= 32: the warps' lists, for warp 0's merge
  __shared__ int64_t stage_indices[kWarps][32];
  __shared__ A warp_max[kWarps];
  extern __shared__ __align__(16) unsigned char list_storage[];  // k > 32: kWarps lists of k pairs
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = row0 + blockIdx.x;
  const A* line = dots + int64_t(blockIdx.x) * N;
  const A x_norm = x_norms[row];

  WarpList<A> registers;
  SharedList<A> shared;
  if constexpr (kRegisters) {
    registers.reset();
  } else {
    A* values = reinterpret_cast<A*>(list_storage);
    int64_t* indices = reinterpret_cast<int64_t*>(list_storage + sizeof(A) * kWarps * k);
    shared = SharedList<A>{values + warp * k, indices + warp * k, k};
    shared.reset();
  }
  A top = -infinity<A>();
  for (int64_t base = int64_t(warp) * 32; base < N; base += kThreads) {
    const int64_t col = base + lane;
    A d = infinity<A>();
    if (col < N) {
      d = (self && col == row) ? A(0) : pair_distance(line[col], x_norm, y_norms[col], metric);
      top = max_of(top, d);
      if (cross != nullptr && row < cross_rows && col >= cross_rows) cross[row * (N - cross_rows) + col - cross_rows] = d;
    }
    if constexpr (kRegisters) offer(registers, k, d, col, col < N);
    else offer(shared, k, d, col, col < N);
  }

#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) top = max_of(top, __shfl_xor_sync(kFull, top, offset));
  if (lane == 0) warp_max[warp] = top;
  if constexpr (kRegisters) {
    stage_values[warp][lane] = registers.value;
    stage_indices[warp][lane] = registers.index;
  }
  __syncthreads();
  if (warp != 0) return;
  for (int w = 1; w < kWarps; ++w) {
    if constexpr (kRegisters) {
      offer(registers, k, stage_values[w][lane], stage_indices[w][lane], lane < k);
    } else {
      const A* values = shared.values + (w * k);
      const int64_t* indices = shared.indices + (w * k);
      for (int base = 0; base < k; base += 32) {
        const int p = base + lane;
        offer(shared, k, p < k ? values[p] : A(0), p < k ? indices[p] : kNoIndex, p < k);
      }
    }
  }
  if (row_max != nullptr && lane == 0) {
    A m = warp_max[0];
    for (int w = 1; w < kWarps; ++w) m = max_of(m, warp_max[w]);
    row_max[row] = m;
  }
  if constexpr (kRegisters) {
    if (lane < k) {
      out_values[row * k + lane] = registers.value;
      out_indices[row * k + lane] = registers.index;
    }
  } else {
    for (int p = lane; p < k; p += 32) {
      out_values[row * k + p] = shared.values[p];
      out_indices[row * k + p] = shared.indices[p];
    }
  }
}

}  // namespace

void select(Dtype dtype, const void* dots, const void* x_norms, const void* y_norms, int64_t rows, int64_t row0,
            int64_t N, int64_t k, int metric, bool self, void* out_values, int64_t* out_indices, void* row_max,
            void* cross, int64_t cross_rows, cudaStream_t stream) {
  if (rows == 0) return;
  if (k > kMaxSharedK) throw std::runtime_error("dpm_ops knn: the CUDA kernel takes k <= 256");
  const unsigned int blocks = static_cast<unsigned int>(rows);
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    const A* dp = typed<A>(dots);
    const A* xn = typed<A>(x_norms);
    const A* yn = typed<A>(y_norms);
    A* ov = typed<A>(out_values);
    A* rm = typed<A>(row_max);
    A* cr = typed<A>(cross);
    if (k <= 32) {
      select_kernel<A, true><<<blocks, kThreads, 0, stream>>>(dp, xn, yn, row0, N, int(k), Metric(metric), self, ov,
                                                              out_indices, rm, cr, cross_rows);
    } else {
      const size_t bytes = size_t(kWarps) * size_t(k) * (sizeof(A) + sizeof(int64_t));
      auto kernel = select_kernel<A, false>;
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                 "knn: cudaFuncSetAttribute(select_kernel, MaxDynamicSharedMemorySize = " + std::to_string(bytes) +
                     " bytes)");
      kernel<<<blocks, kThreads, bytes, stream>>>(dp, xn, yn, row0, N, int(k), Metric(metric), self, ov, out_indices,
                                                  rm, cr, cross_rows);
    }
  });
}

}  // namespace dpm_ops::knn::cuda
