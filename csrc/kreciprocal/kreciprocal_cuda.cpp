// CUDA entry points of the sparse k-reciprocal stages (kernels: kreciprocal_kernels.cu): the same
// schemas, checks and outputs as the CPU kernels. Ragged outputs in two passes: the kernels count,
// at::cumsum makes row_ptr, the kernels fill. Built only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "../common/aten_cuda.h"
#include "../common/compute_type.h"
#include "../common/csr_transpose.h"
#include "../common/sparse_stages_cuda.h"
#include "kreciprocal_checks.h"
#include "kreciprocal_cuda.h"
#include "../common/register_kernels.h"

namespace dpm_ops::kreciprocal {
namespace {

std::tuple<at::Tensor, at::Tensor> expand_cuda(const at::Tensor& neighbours_in, int64_t k1, int64_t half_k1) {
  const c10::cuda::CUDAGuard guard(neighbours_in.device());
  const ExpandArgs a(neighbours_in, k1, half_k1);
  const at::Tensor& neighbours = a.neighbours;
  const int64_t N = a.N, width = a.width, count1 = a.count1, count_h = a.count_h;
  const cudaStream_t stream = current_stream();
  const int64_t* nb = neighbours.const_data_ptr<int64_t>();
  at::Tensor half_sets = at::empty({N * count_h}, neighbours.options());
  at::Tensor half_sizes = at::empty({N}, neighbours.options()), sizes = at::empty({N}, neighbours.options());
  cuda::half_sets(nb, N, width, count_h, half_sets.data_ptr<int64_t>(), half_sizes.data_ptr<int64_t>(), stream);
  at::Tensor scratch = scratch_for(cuda::scratch_threads(N), count1 * (count_h + 2), neighbours.options());
  cuda::expand_count(nb, N, width, count1, count_h, half_sets.const_data_ptr<int64_t>(),
                     half_sizes.const_data_ptr<int64_t>(), scratch.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(),
                     stream);
  at::Tensor row_ptr = row_pointers(sizes);
  at::Tensor cols = at::empty({row_ptr[N].item<int64_t>()}, neighbours.options());
  cuda::expand_fill(nb, N, width, count1, count_h, half_sets.const_data_ptr<int64_t>(),
                    half_sizes.const_data_ptr<int64_t>(), scratch.data_ptr<int64_t>(),
                    row_ptr.const_data_ptr<int64_t>(), cols.data_ptr<int64_t>(), stream);
  return {row_ptr, cols};
}

at::Tensor pair_sqdist_cuda(const at::Tensor& features_in, const at::Tensor& cand_values_in,
                            const at::Tensor& cand_indices_in, const at::Tensor& row_ptr_in, const at::Tensor& cols_in) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(cand_values_in, "cand_values"),
                                {cand_indices_in, "cand_indices"}, {row_ptr_in, "row_ptr"}, {cols_in, "cols"}})
    check_device(kOp, t, features_in, name);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const PairSqdistArgs a(features_in, cand_values_in, cand_indices_in, row_ptr_in, cols_in);
  const at::Tensor &features = a.features, &cand_values = a.cand_values, &cand_indices = a.cand_indices,
                   &row_ptr = a.row_ptr, &cols = a.cols;
  at::Tensor out = at::empty({cols.size(0)}, cols.options().dtype(at::kFloat));
  cuda::pair_sqdist(dtype_of(features), features.const_data_ptr(), features.size(0), features.size(1),
                    cand_values.const_data_ptr<float>(), cand_indices.const_data_ptr<int64_t>(), cand_indices.size(1),
                    row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(), cols.size(0),
                    out.data_ptr<float>(), current_stream());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> query_expansion_cuda(const at::Tensor& row_ptr_in,
                                                                    const at::Tensor& cols_in,
                                                                    const at::Tensor& values_in,
                                                                    const at::Tensor& sources_in) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(cols_in, "cols"), {values_in, "values"},
                                {sources_in, "sources"}})
    check_device(kOp, t, row_ptr_in, name);
  const c10::cuda::CUDAGuard guard(row_ptr_in.device());
  const QueryExpansionArgs a(row_ptr_in, cols_in, values_in, sources_in);
  const at::Tensor &row_ptr = a.row_ptr, &cols = a.cols, &values = a.values, &sources = a.sources;
  const int64_t N = a.N, k2 = a.k2;
  const cudaStream_t stream = current_stream();
  at::Tensor scratch = scratch_for(cuda::scratch_threads(N), 2 * k2, row_ptr.options());
  at::Tensor sizes = at::empty({N}, row_ptr.options());
  cuda::query_expansion_count(row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
                              sources.const_data_ptr<int64_t>(), N, k2, scratch.data_ptr<int64_t>(),
                              sizes.data_ptr<int64_t>(), stream);
  at::Tensor out_ptr = row_pointers(sizes);
  const int64_t nnz = out_ptr[N].item<int64_t>();
  at::Tensor out_cols = at::empty({nnz}, cols.options()), out_values = at::empty({nnz}, values.options());
  cuda::query_expansion_fill(row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
                             values.const_data_ptr<float>(), sources.const_data_ptr<int64_t>(), N, k2,
                             scratch.data_ptr<int64_t>(), out_ptr.const_data_ptr<int64_t>(),
                             out_cols.data_ptr<int64_t>(), out_values.data_ptr<float>(), stream);
  return {out_ptr, out_cols, out_values};
}

void jaccard_blend_cuda(at::Tensor& out, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                        const at::Tensor& values_in, double lambda_value, const c10::optional<at::Tensor>& scale_in) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>(row_ptr_in, "row_ptr"), {cols_in, "cols"},
                                {values_in, "values"}})
    check_device(kOp, t, out, name);
  if (scale_in.has_value()) check_device(kOp, *scale_in, out, "row_scale");
  const c10::cuda::CUDAGuard guard(out.device());
  const JaccardArgs a(out, row_ptr_in, cols_in, values_in, scale_in);
  const at::Tensor &row_ptr = a.row_ptr, &cols = a.cols, &values = a.values;
  const int64_t Q = a.Q, G = a.G, N = a.N;
  if (Q == 0 || G == 0) return;
  const CsrTranspose gallery = transpose_rows(row_ptr, cols, values, Q, N, N);  // the gallery rows of each column
  // empty where a block's sums fit in shared memory
  at::Tensor overlap = at::zeros({cuda::query_gallery_scratch(Q, G)}, values.options());
  cuda::jaccard_blend(out.data_ptr<float>(), Q, G, row_ptr.const_data_ptr<int64_t>(), cols.const_data_ptr<int64_t>(),
                      values.const_data_ptr<float>(), gallery.col_ptr.const_data_ptr<int64_t>(),
                      gallery.rows.const_data_ptr<int64_t>(), gallery.values.const_data_ptr<float>(),
                      a.scale_or_null(), float(1.0 - lambda_value),
                      float(lambda_value), overlap.data_ptr<float>(), current_stream());
}

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "kreciprocal_expand", &expand_cuda,
                "kreciprocal_pair_sqdist", &pair_sqdist_cuda,
                "kreciprocal_query_expansion", &query_expansion_cuda,
                "kreciprocal_jaccard_blend_", &jaccard_blend_cuda)

}  // namespace dpm_ops::kreciprocal
