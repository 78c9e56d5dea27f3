// CUDA kernels of the sparse GNN re-ranking stages: the per-row logic of gnn_rerank_math.h (the same
// code as the CPU kernels, so the same numbers bit for bit). No torch headers: see gnn_rerank_cuda.h.
#include "../common/launch.cuh"
#include "gnn_rerank_cuda.h"
#include "gnn_rerank_math.h"
#include "../kreciprocal/query_gallery_sums.cuh"

namespace dpm_ops::gnn_rerank::cuda {
namespace {

constexpr int kThreads = 128;

// Count pass (sizes != nullptr; values and weights unread) or fill pass (row i straight into out_cols /
// out_values at out_row_ptr[i], then divided by its norm there: propagated_row writes exactly the
// counted entries). The pass is told by sizes, not by out_cols: with no entries at all (k2 == 0, or
// an A without entries), out_cols is an empty tensor's null pointer, and propagated_row writes nothing.
__global__ void propagate_kernel(const int64_t* row_ptr, const int64_t* cols, const float* values,
                                 const int64_t* t_ptr, const int64_t* t_cols, const float* t_values,
                                 const int64_t* sources, const float* weights, int64_t N, int64_t k2,
                                 int64_t* scratch, int64_t* sizes, const int64_t* out_row_ptr, int64_t* out_cols,
                                 float* out_values) {
  const int64_t t = thread_index();
  int64_t* cursor = scratch + t * 4 * k2;
  for (int64_t i = t; i < N; i += thread_count()) {
    if (sizes != nullptr) {
      sizes[i] = propagated_row(row_ptr, cols, values, t_ptr, t_cols, t_values, sources + i * k2, weights, k2, cursor,
                                nullptr, nullptr);
    } else {
      float* row = out_values + out_row_ptr[i];
      const int64_t size = propagated_row(row_ptr, cols, values, t_ptr, t_cols, t_values, sources + i * k2,
                                          weights + i * k2, k2, cursor, out_cols + out_row_ptr[i], row);
      normalise_row(row, size);
    }
  }
}

}  // namespace

void propagate_count(const int64_t* row_ptr, const int64_t* cols, const int64_t* t_ptr, const int64_t* t_cols,
                     const int64_t* sources, int64_t N, int64_t k2, int64_t* scratch, int64_t* sizes,
                     cudaStream_t stream) {
  if (N == 0) return;
  propagate_kernel<<<blocks_for(scratch_threads(N), kThreads), kThreads, 0, stream>>>(
      row_ptr, cols, nullptr, t_ptr, t_cols, nullptr, sources, nullptr, N, k2, scratch, sizes, nullptr, nullptr,
      nullptr);
  check_launch();
}

void propagate_fill(const int64_t* row_ptr, const int64_t* cols, const float* values, const int64_t* t_ptr,
                    const int64_t* t_cols, const float* t_values, const int64_t* sources, const float* weights,
                    int64_t N, int64_t k2, int64_t* scratch, const int64_t* out_row_ptr, int64_t* out_cols,
                    float* out_values, cudaStream_t stream) {
  if (N == 0) return;
  propagate_kernel<<<blocks_for(scratch_threads(N), kThreads), kThreads, 0, stream>>>(
      row_ptr, cols, values, t_ptr, t_cols, t_values, sources, weights, N, k2, scratch, nullptr, out_row_ptr,
      out_cols, out_values);
  check_launch();
}

void similarity(float* out, int64_t Q, int64_t G, const int64_t* row_ptr, const int64_t* cols, const float* values,
                const int64_t* column_start, const int64_t* holder, const float* holder_value,
                float propagated_weight, float cosine_weight, float* dots, cudaStream_t stream) {
  kreciprocal::cuda::launch_query_gallery_sums(out, Q, G, row_ptr, cols, values, column_start, holder, holder_value,
                                               dots, ProductShare{}, BlendFinish{propagated_weight, cosine_weight},
                                               stream);
}

}  // namespace dpm_ops::gnn_rerank::cuda
