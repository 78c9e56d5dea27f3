// The query x gallery sums of the sparse re-ranking stages (query_gallery_sums.h says what they are), as
// a CUDA kernel: one block per query (grid-stride), the query's columns in order, each column's gallery
// holders (distinct rows) shared by the block's threads, a barrier between columns, so that every pair's
// sum adds its terms in the query's column order, as the CPU loop does. Then the finish, row by row.
#pragma once

#include <cstdint>

#include "kreciprocal_math.h"

namespace dpm_ops::kreciprocal::cuda {

constexpr int kQueryGalleryThreads = 256;

// sums_all: gridDim.x * G floats, zeroed (the kernel leaves them zeroed).
template <class Share, class Finish>
__global__ void query_gallery_sums_kernel(float* out, int64_t Q, int64_t G, const int64_t* row_ptr,
                                          const int64_t* cols, const float* values, const int64_t* column_start,
                                          const int64_t* holder, const float* holder_value, float* sums_all,
                                          Share share, Finish finish) {
  float* sums = sums_all + int64_t(blockIdx.x) * G;
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

}  // namespace dpm_ops::kreciprocal::cuda
