// CUDA kernel of the fused distance + top-k. No torch headers: see knn_cuda.h.
//
// One block of kWarps warps owns kRows rows of x and streams y in kCols-column tiles:
//   1. the block computes the kRows x kCols dot-product tile through shared memory (D in kDepth
//      steps) and turns it into distances (knn_math.h) in shared memory;
//   2. each warp merges its rows' tile values into the rows' sorted (value, index) lists, as in
//      faiss's WarpSelect: a lane's value enters only if it beats the list's current k-th pair
//      (one ballot for 32 columns); each entering value is inserted by the whole warp at once.
// k <= 32: the list lives in registers, lane l holding the l-th smallest pair; an insertion at p is
// one ballot (p = number of smaller pairs) and one shuffle up. k > 32: the list lives in shared
// memory and the warp shifts it cooperatively.
#include <cuda_runtime.h>

#include <cfloat>

#include "../common/cuda_utils.cuh"
#include "knn_cuda.h"
#include "knn_math.h"

namespace dpm_ops {
namespace knn {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 32;   // rows of x per block (4 per warp)
constexpr int kCols = 64;   // columns of y per tile
constexpr int kDepth = 16;  // features per shared-memory step
constexpr int64_t kNoIndex = INT64_MAX;

template <typename A> __device__ __forceinline__ A infinity();
template <> __device__ __forceinline__ float infinity<float>() { return FLT_MAX * 2.f; }
template <> __device__ __forceinline__ double infinity<double>() { return DBL_MAX * 2.0; }

// The kRows x kCols distance tile of rows r0.. against columns c0.., in shared memory.
template <typename A>
__device__ void distance_tile(const A* __restrict__ x, const A* __restrict__ y, const A* __restrict__ x_norms,
                              const A* __restrict__ y_norms, int64_t M, int64_t N, int64_t D, int64_t r0, int64_t c0,
                              Metric metric, bool self, A (*xs)[kRows], A (*ys)[kCols], A (*tile)[kCols + 1]) {
  // Each thread owns 8 outputs: row (tid / 8) (of 32), columns (tid % 8) + 8 j.
  const int tid = threadIdx.x, tr = tid / 8, tc = tid % 8;
  A acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = A(0);
  for (int64_t d0 = 0; d0 < D; d0 += kDepth) {
    for (int i = tid; i < kRows * kDepth; i += kThreads) {
      const int r = i / kDepth, d = i % kDepth;
      xs[d][r] = (r0 + r < M && d0 + d < D) ? x[(r0 + r) * D + d0 + d] : A(0);
    }
    for (int i = tid; i < kCols * kDepth; i += kThreads) {
      const int c = i / kDepth, d = i % kDepth;
      ys[d][c] = (c0 + c < N && d0 + d < D) ? y[(c0 + c) * D + d0 + d] : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const A xv = xs[d][tr];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] += xv * ys[d][tc + 8 * j];
    }
    __syncthreads();
  }
  const int64_t row = r0 + tr;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t col = c0 + tc + 8 * j;
    A d = infinity<A>();
    if (row < M && col < N) {
      d = pair_distance(acc[j], x_norms[row], y_norms[col], metric);
      if (self && row == col) d = A(0);
    }
    tile[tr][tc + 8 * j] = d;
  }
  __syncthreads();
}

// Register list (k <= 32): lane l holds the l-th smallest pair of its warp's current row.
template <typename A> struct WarpList {
  A value;
  int64_t index;

  __device__ void reset() {
    value = infinity<A>();
    index = kNoIndex;
  }
  // The k-th smallest pair, on every lane.
  __device__ void kth(int k, A& v, int64_t& i) const {
    v = __shfl_sync(0xffffffffu, value, k - 1);
    i = __shfl_sync(0xffffffffu, index, k - 1);
  }
  // Inserts (v, i) (the same on every lane), known to beat the k-th pair.
  __device__ void insert(A v, int64_t i) {
    const int lane = threadIdx.x % 32;
    const int position = __popc(__ballot_sync(0xffffffffu, pair_less(value, index, v, i)));
    const A up_value = __shfl_up_sync(0xffffffffu, value, 1);
    const int64_t up_index = __shfl_up_sync(0xffffffffu, index, 1);
    if (lane == position) {
      value = v;
      index = i;
    } else if (lane > position) {
      value = up_value;
      index = up_index;
    }
  }
};

// Shared-memory list (any k <= kMaxSharedK), kept sorted by the warp.
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
  __device__ void insert(A v, int64_t i) {
    const int lane = threadIdx.x % 32;
    int position = 0;
    for (int base = 0; base < k; base += 32) {
      const int p = base + lane;
      position += __popc(__ballot_sync(0xffffffffu, p < k && pair_less(values[p], indices[p], v, i)));
    }
    // Shift [position, k - 1) up by one: read everything first, then write.
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

// Offers one row of the tile to the row's list: one ballot per 32 columns, then the entering
// values one at a time (re-checked against the k-th pair, which each insertion lowers).
template <typename A, typename List>
__device__ void merge_row(List& list, int k, const A* line, int64_t c0, int64_t N) {
  const int lane = threadIdx.x % 32;
  for (int base = 0; base < kCols; base += 32) {
    const int64_t col = c0 + base + lane;
    const A v = line[base + lane];
    A kth_v;
    int64_t kth_i;
    list.kth(k, kth_v, kth_i);
    unsigned pending = __ballot_sync(0xffffffffu, col < N && pair_less(v, col, kth_v, kth_i));
    while (pending) {
      const int source = __ffs(pending) - 1;
      pending &= pending - 1;
      const A cv = __shfl_sync(0xffffffffu, v, source);
      const int64_t ci = c0 + base + source;
      list.kth(k, kth_v, kth_i);
      if (pair_less(cv, ci, kth_v, kth_i)) list.insert(cv, ci);
    }
  }
}

template <typename A, bool kRegisters>
__global__ void __launch_bounds__(kThreads)
knn_kernel(const A* __restrict__ x, const A* __restrict__ y, const A* __restrict__ x_norms,
           const A* __restrict__ y_norms, int64_t M, int64_t N, int64_t D, int k, Metric metric, bool self,
           A* __restrict__ out_values, int64_t* __restrict__ out_indices, A* __restrict__ row_max,
           A* __restrict__ cross, int64_t cross_rows) {
  __shared__ A xs[kDepth][kRows];
  __shared__ A ys[kDepth][kCols];
  __shared__ A tile[kRows][kCols + 1];
  extern __shared__ unsigned char list_storage[];  // k > 32: kRows lists of k pairs
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  constexpr int kRowsPerWarp = kRows / kWarps;

  WarpList<A> registers[kRowsPerWarp];
  SharedList<A> shared[kRowsPerWarp];
  A top[kRowsPerWarp];
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
    const int local = warp * kRowsPerWarp + w;
    top[w] = -infinity<A>();
    if (kRegisters) {
      registers[w].reset();
    } else {
      A* values = reinterpret_cast<A*>(list_storage);
      int64_t* indices = reinterpret_cast<int64_t*>(list_storage + sizeof(A) * kRows * k);
      shared[w] = SharedList<A>{values + local * k, indices + local * k, k};
      shared[w].reset();
    }
  }
  for (int64_t c0 = 0; c0 < N; c0 += kCols) {
    distance_tile<A>(x, y, x_norms, y_norms, M, N, D, r0, c0, metric, self, xs, ys, tile);
#pragma unroll
    for (int w = 0; w < kRowsPerWarp; ++w) {
      const int local = warp * kRowsPerWarp + w;
      const int64_t row = r0 + local;
      if (row >= M) continue;  // warp-uniform
      const A* line = tile[local];
      for (int base = lane; base < kCols; base += 32) {
        const int64_t col = c0 + base;
        if (col < N) {
          top[w] = max_of(top[w], line[base]);
          if (cross != nullptr && row < cross_rows && col >= cross_rows)
            cross[row * (N - cross_rows) + (col - cross_rows)] = line[base];
        }
      }
      if (kRegisters) merge_row<A>(registers[w], k, line, c0, N);
      else merge_row<A>(shared[w], k, line, c0, N);
    }
    __syncthreads();  // the tile is rewritten next round
  }
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
    const int local = warp * kRowsPerWarp + w;
    const int64_t row = r0 + local;
    if (row >= M) continue;
    A m = top[w];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) m = max_of(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (row_max != nullptr && lane == 0) row_max[row] = m;
    if (kRegisters) {
      if (lane < k) {
        out_values[row * k + lane] = registers[w].value;
        out_indices[row * k + lane] = registers[w].index;
      }
    } else {
      for (int p = lane; p < k; p += 32) {
        out_values[row * k + p] = shared[w].values[p];
        out_indices[row * k + p] = shared[w].indices[p];
      }
    }
  }
}

}  // namespace

void knn(Dtype dtype, const void* x, const void* y, const void* x_norms, const void* y_norms, int64_t M, int64_t N,
         int64_t D, int64_t k, int metric, bool self, void* out_values, int64_t* out_indices, void* row_max,
         void* cross, int64_t cross_rows, cudaStream_t stream) {
  if (M == 0) return;
  if (k > kMaxSharedK) throw std::runtime_error("dpm_ops knn: the CUDA kernel takes k <= 256");
  const unsigned int blocks = static_cast<unsigned int>((M + kRows - 1) / kRows);
  auto launch = [&](auto tag) {
    using A = typename decltype(tag)::type;
    const A* xa = static_cast<const A*>(x);
    const A* ya = static_cast<const A*>(y);
    const A* xn = static_cast<const A*>(x_norms);
    const A* yn = static_cast<const A*>(y_norms);
    A* ov = static_cast<A*>(out_values);
    A* rm = static_cast<A*>(row_max);
    A* cr = static_cast<A*>(cross);
    if (k <= 32) {
      knn_kernel<A, true><<<blocks, kThreads, 0, stream>>>(xa, ya, xn, yn, M, N, D, int(k), Metric(metric), self, ov,
                                                           out_indices, rm, cr, cross_rows);
    } else {
      const size_t bytes = size_t(kRows) * size_t(k) * (sizeof(A) + sizeof(int64_t));
      auto kernel = knn_kernel<A, false>;
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
      kernel<<<blocks, kThreads, bytes, stream>>>(xa, ya, xn, yn, M, N, D, int(k), Metric(metric), self, ov,
                                                  out_indices, rm, cr, cross_rows);
    }
  };
  if (dtype == Dtype::kDouble) launch(TypeTag<double>{});
  else launch(TypeTag<float>{});
  DPM_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace knn
}  // namespace dpm_ops
