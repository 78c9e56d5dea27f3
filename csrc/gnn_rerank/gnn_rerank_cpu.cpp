// CPU kernels of the sparse GNN re-ranking stages (per-row logic: gnn_rerank_math.h). The propagated
// adjacency is CSR (row_ptr (N + 1), cols ascending per row, float32 values); rows run in parallel,
// each thread with its own scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/chunked_rows.h"
#include "../common/csr_transpose.h"
#include "gnn_rerank_checks.h"
#include "gnn_rerank_math.h"
#include "../kreciprocal/query_gallery_sums.h"
#include "../common/register_kernels.h"

namespace dpm_ops::gnn_rerank {
namespace {

constexpr int64_t kRowGrain = 256;

// Row i of the result: propagated_row of A + A^T over sources[i, :] weighted by weights[i, :], then
// divided by its L2 norm. CSR in, CSR out (cols ascending).
std::tuple<at::Tensor, at::Tensor, at::Tensor> propagate_cpu(const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                                                             const at::Tensor& values_in, const at::Tensor& sources_in,
                                                             const at::Tensor& weights_in) {
  const PropagateArgs a(row_ptr_in, cols_in, values_in, sources_in, weights_in);
  const int64_t N = a.N, k2 = a.k2;
  const CsrTranspose transposed = transpose_rows(a.row_ptr, a.cols, a.values, 0, N, N);
  const int64_t* rp = a.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = a.cols.const_data_ptr<int64_t>();
  const float* vp = a.values.const_data_ptr<float>();
  const int64_t* tp = transposed.col_ptr.const_data_ptr<int64_t>();
  const int64_t* tc = transposed.rows.const_data_ptr<int64_t>();
  const float* tv = transposed.values.const_data_ptr<float>();
  const int64_t* sp = a.sources.const_data_ptr<int64_t>();
  const float* wp = a.weights.const_data_ptr<float>();
  const auto rows = rows_by_chunks<CsrEntries>(N, kRowGrain, a.row_ptr.options(), [&] {
    return [&, cursor = std::vector<int64_t>(4 * k2)](int64_t i, CsrEntries& out) mutable {
      const int64_t* sources = sp + i * k2;
      int64_t most = 0;  // a row holds at most its sources' entries in A and A^T together
      for (int64_t t = 0; t < k2; ++t)
        most += rp[sources[t] + 1] - rp[sources[t]] + tp[sources[t] + 1] - tp[sources[t]];
      return append_row(out, most, [&](int64_t* cols, float* values) {
        const int64_t size = propagated_row(rp, cp, vp, tp, tc, tv, sources, wp + i * k2, k2, cursor.data(), cols,
                                            values);
        normalise_row(values, size);
        return size;
      });
    };
  });
  return csr_of(rows, a.row_ptr.options());
}

// out (Q, G) holds cos(q, g) and is overwritten in place by blend_score of <A_q, A_{Q+g}> (summed in the
// query row's column order, through an inverted index of the gallery rows: query_gallery_sums) and that cosine.
void similarity_cpu(at::Tensor& out, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                    const at::Tensor& values_in, double lambda_value) {
  const SimilarityArgs a(out, row_ptr_in, cols_in, values_in);
  kreciprocal::query_gallery_sums(a, out.data_ptr<float>(), ProductShare{},
                                  BlendFinish{float(1.0 - lambda_value), float(lambda_value)});
}

}  // namespace

DPM_OPS_KERNELS(CPU,
                "gnn_propagate", &propagate_cpu,
                "gnn_similarity_", &similarity_cpu)

}  // namespace dpm_ops::gnn_rerank
