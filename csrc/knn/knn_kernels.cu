// CUDA selection kernel of the distance + top-k. No torch headers: see knn_cuda.h.
//
// The dot products come from cuBLAS (knn_cuda.cpp, common/gemm.h), a block of rows at a time; this
// kernel turns one block into distances (knn_math.h) and selects every row's k smallest
// (distance, index) pairs: one thread block per row, its warps' lists merged as knn_select.cuh says.
#include <cuda_runtime.h>

#include <stdexcept>

#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "knn_cuda.h"
#include "knn_math.h"
#include "knn_select.cuh"

namespace dpm_ops::knn::cuda {
namespace {

// Row `row0 + blockIdx.x`: dots (its line of the block) -> distances -> the k smallest pairs, the
// row maximum and its cross-block entries.
template <typename A, bool kRegisters>
__global__ void __launch_bounds__(kThreads)
select_kernel(const A* __restrict__ dots, const A* __restrict__ x_norms, const A* __restrict__ y_norms,
              int64_t row0, int64_t N, int k, Metric metric, bool self, A* __restrict__ out_values,
              int64_t* __restrict__ out_indices, A* __restrict__ row_max, A* __restrict__ cross,
              int64_t cross_rows) {
  __shared__ A warp_max[kWarps];
  extern __shared__ __align__(16) unsigned char list_storage[];  // k > 32: kWarps lists of k pairs
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = row0 + blockIdx.x;
  const A* line = dots + int64_t(blockIdx.x) * N;
  const A x_norm = x_norms[row];

  RowSelect<A, kRegisters> select(k, list_storage);
  A top = -infinity<A>();
  select.offer_row(N, [&](int64_t col) {
    const A d = (self && col == row) ? A(0) : pair_distance(line[col], x_norm, y_norms[col], metric);
    top = max_of(top, d);
    if (cross != nullptr && row < cross_rows && col >= cross_rows) cross[row * (N - cross_rows) + col - cross_rows] = d;
    return d;
  });

#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) top = max_of(top, __shfl_xor_sync(kFull, top, offset));
  if (lane == 0) warp_max[warp] = top;
  select.merge();
  if (warp != 0) return;
  if (row_max != nullptr && lane == 0) {
    A m = warp_max[0];
    for (int w = 1; w < kWarps; ++w) m = max_of(m, warp_max[w]);
    row_max[row] = m;
  }
  select.store(out_values + row * k, out_indices + row * k);
}

}  // namespace

void select(Dtype dtype, const void* dots, const void* x_norms, const void* y_norms, int64_t rows, int64_t row0,
            int64_t N, int64_t k, int metric, bool self, void* out_values, int64_t* out_indices, void* row_max,
            void* cross, int64_t cross_rows, cudaStream_t stream) {
  if (rows == 0) return;
  if (k > kMaxSharedK) throw std::runtime_error("dpm_ops knn: the CUDA kernel takes k <= 256");
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    launch_row_select<A>(select_kernel<A, true>, select_kernel<A, false>, k, rows, stream, "knn select_kernel",
                         typed<A>(dots), typed<A>(x_norms), typed<A>(y_norms), row0, N, int(k), Metric(metric), self,
                         typed<A>(out_values), out_indices, typed<A>(row_max), typed<A>(cross), cross_rows);
  });
}

}  // namespace dpm_ops::knn::cuda
