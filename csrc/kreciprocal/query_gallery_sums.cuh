// The query x gallery sums of the sparse re-ranking stages (query_gallery_sums.h says what they are), as
// a CUDA kernel: one block per query (grid-stride), the query's columns in order, each column's gallery
// holders (distinct rows) shared by the block's threads, a barrier between columns, so that every pair's
// sum adds its terms in the query's column order, as the CPU loop does. Then the finish, row by row. The
// block's G running sums live in shared memory where they fit (Market-1501's gallery: 64 KB), a
// read-modify-write there instead of through L2.
#pragma once

#include <cstdint>
#include <string>

#include "../common/launch.cuh"
#include "kreciprocal_cuda.h"
#include "kreciprocal_math.h"

namespace dpm_ops::kreciprocal::cuda {

constexpr int kQueryGalleryThreads = 256;

// InShared: the block's G sums in dynamic shared memory (zeroed here), else at sums_all + blockIdx.x * G
// (gridDim.x * G floats, zeroed by the caller). The kernel leaves them zeroed.
template <bool InShared, class Share, class Finish>
__global__ void query_gallery_sums_kernel(float* out, int64_t Q, int64_t G, const int64_t* row_ptr,
                                          const int64_t* cols, const float* values, const int64_t* column_start,
                                          const int64_t* holder, const float* holder_value, float* sums_all,
                                          Share share, Finish finish) {
  extern __shared__ __align__(16) unsigned char shared_storage[];
  float* sums = InShared ? reinterpret_cast<float*>(shared_storage) : sums_all + int64_t(blockIdx.x) * G;
  if (InShared) {
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) sums[g] = 0.f;
    __syncthreads();
  }
  for (int64_t q = blockIdx.x; q < Q; q += gridDim.x) {
    for (int64_t e = row_ptr[q]; e < row_ptr[q + 1]; ++e) {
      const int64_t c = cols[e];
      const float v = values[e];
      for (int64_t s = column_start[c] + threadIdx.x; s < column_start[c + 1]; s += blockDim.x)
        sums[holder[s]] = add_rn(sums[holder[s]], share(v, holder_value[s]));
      __syncthreads();
    }
    float* row = out + q * G;
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
      row[g] = finish(q, sums[g], row[g]);
      sums[g] = 0.f;
    }
    __syncthreads();
  }
}

// The kernel over query_gallery_blocks(Q) blocks, its sums in shared memory where G of them fit
// (query_gallery_scratch(Q, G) == 0; sums_all unused then).
template <class Share, class Finish>
void launch_query_gallery_sums(float* out, int64_t Q, int64_t G, const int64_t* row_ptr, const int64_t* cols,
                               const float* values, const int64_t* column_start, const int64_t* holder,
                               const float* holder_value, float* sums_all, Share share, Finish finish,
                               cudaStream_t stream) {
  if (Q == 0 || G == 0) return;
  const auto blocks = static_cast<unsigned int>(query_gallery_blocks(Q));
  if (query_gallery_scratch(Q, G) == 0) {
    const size_t bytes = size_t(G) * sizeof(float);
    auto* kernel = query_gallery_sums_kernel<true, Share, Finish>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "query_gallery_sums: cudaFuncSetAttribute(MaxDynamicSharedMemorySize = " + std::to_string(bytes) + ")");
    kernel<<<blocks, kQueryGalleryThreads, bytes, stream>>>(out, Q, G, row_ptr, cols, values, column_start, holder,
                                                            holder_value, sums_all, share, finish);
  } else {
    query_gallery_sums_kernel<false, Share, Finish><<<blocks, kQueryGalleryThreads, 0, stream>>>(
        out, Q, G, row_ptr, cols, values, column_start, holder, holder_value, sums_all, share, finish);
  }
  check_launch();
}

}  // namespace dpm_ops::kreciprocal::cuda
