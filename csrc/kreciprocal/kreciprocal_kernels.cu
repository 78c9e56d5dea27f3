// CUDA kernels of the sparse k-reciprocal stages: the per-row logic of kreciprocal_math.h (the
// same code as the CPU kernels, so the same numbers bit for bit). No torch headers: see
// kreciprocal_cuda.h.
#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "kreciprocal_cuda.h"
#include "kreciprocal_math.h"
#include "query_gallery_sums.cuh"

namespace dpm_ops::kreciprocal::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void half_sets_kernel(const int64_t* neighbours, int64_t N, int64_t width, int64_t count_h,
                                 int64_t* half_sets, int64_t* half_sizes) {
  const int64_t c = thread_index();
  if (c < N) half_sizes[c] = reciprocal_set(neighbours, width, c, count_h, half_sets + c * count_h);
}

// Count pass (sizes != nullptr; own and out in scratch) or fill pass (R*(i) straight into cols at
// row_ptr[i]: expanded_set writes exactly |R*(i)| items there). The pass is told by sizes, not by cols:
// an output without entries is an empty tensor, whose pointer is null.
__global__ void expand_kernel(const int64_t* neighbours, int64_t N, int64_t width, int64_t count1, int64_t count_h,
                              const int64_t* half_sets, const int64_t* half_sizes, int64_t* scratch,
                              int64_t* sizes, const int64_t* row_ptr, int64_t* cols) {
  const int64_t t = thread_index();
  int64_t* own = scratch + t * (sizes != nullptr ? count1 * (count_h + 2) : count1);
  for (int64_t i = t; i < N; i += thread_count()) {
    if (sizes != nullptr) {
      sizes[i] = expanded_set(neighbours, width, i, count1, count_h, half_sets, half_sizes, own, own + count1);
    } else {
      expanded_set(neighbours, width, i, count1, count_h, half_sets, half_sizes, own, cols + row_ptr[i]);
    }
  }
}

template <typename A>
__global__ void pair_sqdist_kernel(const A* x, int64_t N, int64_t D, const float* cand_values,
                                   const int64_t* cand_indices, int64_t m, const int64_t* row_ptr,
                                   const int64_t* cols, int64_t nnz, float* out) {
  const int64_t e = thread_index();
  if (e < nnz)
    out[e] = kreciprocal::pair_sqdist(x, D, cand_values, cand_indices, m, row_of_entry(row_ptr, N, e), cols[e]);
}

__global__ void query_expansion_kernel(const int64_t* row_ptr, const int64_t* cols, const float* values,
                                       const int64_t* sources, int64_t N, int64_t k2, int64_t* scratch,
                                       int64_t* sizes, const int64_t* out_row_ptr, int64_t* out_cols,
                                       float* out_values) {
  const int64_t t = thread_index();
  int64_t* cursor = scratch + t * 2 * k2;
  for (int64_t i = t; i < N; i += thread_count()) {
    if (sizes != nullptr) {  // the count pass (out_cols is null for an output without entries, too)
      sizes[i] = expansion_row(row_ptr, cols, values, sources + i * k2, k2, cursor, nullptr, nullptr);
    } else {
      expansion_row(row_ptr, cols, values, sources + i * k2, k2, cursor, out_cols + out_row_ptr[i],
                    out_values + out_row_ptr[i]);
    }
  }
}

}  // namespace

void half_sets(const int64_t* neighbours, int64_t N, int64_t width, int64_t count_h, int64_t* half_sets,
               int64_t* half_sizes, cudaStream_t stream) {
  if (N == 0) return;
  half_sets_kernel<<<blocks_for(N, kThreads), kThreads, 0, stream>>>(neighbours, N, width, count_h, half_sets,
                                                                     half_sizes);
  check_launch();
}

void expand_count(const int64_t* neighbours, int64_t N, int64_t width, int64_t count1, int64_t count_h,
                  const int64_t* half_sets, const int64_t* half_sizes, int64_t* scratch, int64_t* sizes,
                  cudaStream_t stream) {
  if (N == 0) return;
  const int64_t threads = scratch_threads(N);
  expand_kernel<<<blocks_for(threads, kThreads), kThreads, 0, stream>>>(
      neighbours, N, width, count1, count_h, half_sets, half_sizes, scratch, sizes, nullptr, nullptr);
  check_launch();
}

void expand_fill(const int64_t* neighbours, int64_t N, int64_t width, int64_t count1, int64_t count_h,
                 const int64_t* half_sets, const int64_t* half_sizes, int64_t* scratch, const int64_t* row_ptr,
                 int64_t* cols, cudaStream_t stream) {
  if (N == 0) return;
  const int64_t threads = scratch_threads(N);
  expand_kernel<<<blocks_for(threads, kThreads), kThreads, 0, stream>>>(
      neighbours, N, width, count1, count_h, half_sets, half_sizes, scratch, nullptr, row_ptr, cols);
  check_launch();
}

void pair_sqdist(Dtype dtype, const void* features, int64_t N, int64_t D, const float* cand_values,
                 const int64_t* cand_indices, int64_t m, const int64_t* row_ptr, const int64_t* cols, int64_t nnz,
                 float* out, cudaStream_t stream) {
  if (nnz == 0) return;
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    pair_sqdist_kernel<A><<<blocks_for(nnz, kThreads), kThreads, 0, stream>>>(typed<A>(features), N, D, cand_values,
                                                                    cand_indices, m, row_ptr, cols, nnz, out);
  });
}

void query_expansion_count(const int64_t* row_ptr, const int64_t* cols, const int64_t* sources, int64_t N,
                           int64_t k2, int64_t* scratch, int64_t* sizes, cudaStream_t stream) {
  if (N == 0) return;
  query_expansion_kernel<<<blocks_for(scratch_threads(N), kThreads), kThreads, 0, stream>>>(
      row_ptr, cols, nullptr, sources, N, k2, scratch, sizes, nullptr, nullptr, nullptr);
  check_launch();
}

void query_expansion_fill(const int64_t* row_ptr, const int64_t* cols, const float* values, const int64_t* sources,
                          int64_t N, int64_t k2, int64_t* scratch, const int64_t* out_row_ptr, int64_t* out_cols,
                          float* out_values, cudaStream_t stream) {
  if (N == 0) return;
  query_expansion_kernel<<<blocks_for(scratch_threads(N), kThreads), kThreads, 0, stream>>>(
      row_ptr, cols, values, sources, N, k2, scratch, nullptr, out_row_ptr, out_cols, out_values);
  check_launch();
}

void jaccard_blend(float* out, int64_t Q, int64_t G, const int64_t* row_ptr, const int64_t* cols, const float* values,
                   const int64_t* column_start, const int64_t* holder, const float* holder_value,
                   const float* row_scale, float jaccard_weight, float keep, float* overlap, cudaStream_t stream) {
  launch_query_gallery_sums(out, Q, G, row_ptr, cols, values, column_start, holder, holder_value, overlap, MinShare{},
                            JaccardFinish{row_scale, jaccard_weight, keep}, stream);
}

}  // namespace dpm_ops::kreciprocal::cuda
