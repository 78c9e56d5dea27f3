// CUDA entry points of the sparse GNN re-ranking stages (kernels: gnn_rerank_kernels.cu): the same
// schemas, checks and outputs as the CPU kernels. The propagated rows in two passes: the kernels count,
// at::cumsum makes row_ptr, the kernels fill. Built only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/aten_cuda.h"
#include "../common/csr_transpose.h"
#include "../common/sparse_stages_cuda.h"
#include "gnn_rerank_checks.h"
#include "gnn_rerank_cuda.h"
#include "../common/register_kernels.h"

namespace dpm_ops::gnn_rerank {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_cuda(const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                                                              const at::Tensor& values_in,
                                                              const at::Tensor& sources_in,
                                                              const at::Tensor& weights_in) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(cols_in, "cols"), {values_in, "values"},
                                {sources_in, "sources"}, {weights_in, "weights"}})
    check_device(kOp, t, row_ptr_in, name);
  const c10::cuda::CUDAGuard guard(row_ptr_in.device());
  const PropagateArgs a(row_ptr_in, cols_in, values_in, sources_in, weights_in);
  const at::Tensor &row_ptr = a.row_ptr, &cols = a.cols, &values = a.values;
  const int64_t N = a.N, k2 = a.k2;
  const cudaStream_t stream = current_stream();
  const CsrTranspose transposed = transpose_rows(row_ptr, cols, values, 0, N, N);  // A^T
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = cols.const_data_ptr<int64_t>();
  const int64_t* tp = transposed.col_ptr.const_data_ptr<int64_t>();
  const int64_t* tc = transposed.rows.const_data_ptr<int64_t>();
  const int64_t* sp = a.sources.const_data_ptr<int64_t>();
  at::Tensor scratch = scratch_for(cuda::scratch_threads(N), 4 * k2, row_ptr.options());
  at::Tensor sizes = at::empty({N}, row_ptr.options());
  cuda::propagate_count(rp, cp, tp, tc, sp, N, k2, scratch.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(), stream);
  at::Tensor out_ptr = row_pointers(sizes);
  const int64_t nnz = out_ptr[N].item<int64_t>();
  at::Tensor out_cols = at::empty({nnz}, cols.options()), out_values = at::empty({nnz}, values.options());
  cuda::propagate_fill(rp, cp, values.const_data_ptr<float>(), tp, tc, transposed.values.const_data_ptr<float>(), sp,
                       a.weights.const_data_ptr<float>(), N, k2, scratch.data_ptr<int64_t>(),
                       out_ptr.const_data_ptr<int64_t>(), out_cols.data_ptr<int64_t>(), out_values.data_ptr<float>(),
                       stream);
  return {out_ptr, out_cols, out_values};
}

void similarity_cuda(at::Tensor& out, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                     const at::Tensor& values_in, double lambda_value) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(row_ptr_in, "row_ptr"), {cols_in, "cols"},
                                {values_in, "values"}})
    check_device(kOp, t, out, name);
  const c10::cuda::CUDAGuard guard(out.device());
  const SimilarityArgs a(out, row_ptr_in, cols_in, values_in);
  const at::Tensor &row_ptr = a.row_ptr, &cols = a.cols, &values = a.values;
  const int64_t Q = a.Q, G = a.G, N = a.N;
  if (Q == 0 || G == 0) return;
  const CsrTranspose gallery = transpose_rows(row_ptr, cols, values, Q, N, N);  // the gallery rows of each column
  // empty where a block's sums fit in shared memory
  at::Tensor dots = at::zeros({cuda::query_gallery_scratch(Q, G)}, values.options());
  cuda::similarity(out.data_ptr<float>(), Q, G, row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
                   values.const_data_ptr<float>(), gallery.col_ptr.const_data_ptr<int64_t>(),
                   gallery.rows.const_data_ptr<int64_t>(), gallery.values.const_data_ptr<float>(),
                   float(1.0 - lambda_value), float(lambda_value), dots.data_ptr<float>(), current_stream());
}

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "gnn_propagate", &propagate_cuda,
                "gnn_similarity_", &similarity_cuda)

}  // namespace dpm_ops::gnn_rerank
