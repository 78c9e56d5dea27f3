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
  struct Entries {
    std::vector<int64_t> cols;
    std::vector<float> values;
  };
  const auto rows = rows_by_chunks<Entries>(N, kRowGrain, a.row_ptr.options(), [&] {
    return [&, cursor = std::vector<int64_t>(4 * k2)](int64_t i, Entries& out) mutable {
      const int64_t* sources = sp + i * k2;
      int64_t most = 0;  // a row holds at most its sources' entries in A and A^T together
      for (int64_t t = 0; t < k2; ++t) most += rp[sources[t] + 1] - rp[sources[t]] + tp[sources[t] + 1] - tp[sources[t]];
      const size_t start = out.cols.size();
      out.cols.resize(start + most);
      out.values.resize(start + most);
      const int64_t size = propagated_row(rp, cp, vp, tp, tc, tv, sources, wp + i * k2, k2, cursor.data(),
                                          out.cols.data() + start, out.values.data() + start);
      normalise_row(out.values.data() + start, size);
      out.cols.resize(start + size);
      out.values.resize(start + size);
      return size;
    };
  });
  const int64_t nnz = rows.row_ptr.const_data_ptr<int64_t>()[N];
  at::Tensor out_cols = at::empty({nnz}, a.cols.options()), out_values = at::empty({nnz}, a.values.options());
  gather_chunks(rows, [](const Entries& entries) -> const auto& { return entries.cols; }, out_cols.data_ptr<int64_t>());
  gather_chunks(rows, [](const Entries& entries) -> const auto& { return entries.values; },
                out_values.data_ptr<float>());
  return {rows.row_ptr, out_cols, out_values};
}

// out (Q, G) holds cos(q, g) and is overwritten in place by blend_score of <A_q, A_{Q+g}> (summed in the
// query row's column order, through an inverted index of the gallery rows) and that cosine.
void similarity_cpu(at::Tensor& out, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                    const at::Tensor& values_in, double lambda_value) {
  const SimilarityArgs a(out, row_ptr_in, cols_in, values_in);
  const int64_t Q = a.Q, G = a.G, N = a.N;
  const CsrTranspose gallery = transpose_rows(a.row_ptr, a.cols, a.values, Q, N, N);
  const int64_t* rp = a.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = a.cols.const_data_ptr<int64_t>();
  const float* vp = a.values.const_data_ptr<float>();
  const int64_t* column_start = gallery.col_ptr.const_data_ptr<int64_t>();
  const int64_t* holder = gallery.rows.const_data_ptr<int64_t>();
  const float* holder_value = gallery.values.const_data_ptr<float>();
  const float propagated_weight = float(1.0 - lambda_value), cosine_weight = float(lambda_value);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, Q, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> dots(G, 0.f);
    for (int64_t q = begin; q < end; ++q) {
      for (int64_t e = rp[q]; e < rp[q + 1]; ++e) {
        const int64_t c = cp[e];
        const float v = vp[e];
        for (int64_t s = column_start[c]; s < column_start[c + 1]; ++s)
          dots[holder[s]] = add_rn(dots[holder[s]], mul_rn(v, holder_value[s]));
      }
      float* row = op + q * G;
      for (int64_t g = 0; g < G; ++g) {
        row[g] = blend_score(dots[g], row[g], propagated_weight, cosine_weight);
        dots[g] = 0.f;
      }
    }
  });
}

}  // namespace

DPM_OPS_KERNELS(CPU,
                "gnn_propagate", &propagate_cpu,
                "gnn_similarity_", &similarity_cpu)

}  // namespace dpm_ops::gnn_rerank
