// CPU kernels of the sparse GNN re-ranking stages (per-row logic: gnn_rerank_math.h). The propagated
// adjacency is CSR (row_ptr (N + 1), cols ascending per row, float32 values); rows run in parallel,
// each thread with its own scratch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
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

// The CPU's form of propagated_row (gnn_rerank_math.h), the same sums bit for bit: each column's terms
// still go in source order, each one rounding, from 0. Each source's rows of A and A^T are merged with
// each other only (a 2-way merge) and their weighted terms added into a dense accumulator of N sums; the
// columns touched are read back in ascending order from a bitmap. The CUDA kernels' 2 k2-way merge
// compares every source's heads at every column of the row, which costs the CPU most of the stage.
class PropagatedRow {
 public:
  explicit PropagatedRow(int64_t N) : sums_(N, 0.f), touched_((N + 63) / 64, 0) {}

  void add_source(const int64_t* cols, const float* values, int64_t a, int64_t a_end, const int64_t* t_cols,
                  const float* t_values, int64_t t, int64_t t_end, float weight) {
    constexpr int64_t kDone = INT64_MAX;
    while (a < a_end || t < t_end) {
      const int64_t a_col = a < a_end ? cols[a] : kDone, t_col = t < t_end ? t_cols[t] : kDone;
      const int64_t col = a_col < t_col ? a_col : t_col;
      // (A + A^T)[n, c], formed before it is weighted
      const float both = a_col == t_col ? add_rn(values[a], t_values[t]) : (a_col < t_col ? values[a] : t_values[t]);
      a += a_col == col;
      t += t_col == col;
      sums_[col] = add_rn(sums_[col], mul_rn(both, weight));
      touched_[col >> 6] |= uint64_t(1) << (col & 63);
    }
  }

  // Writes the touched columns (ascending) and their sums, clears them; returns how many.
  int64_t drain(int64_t* out_cols, float* out_values) {
    int64_t size = 0;
    for (size_t word = 0; word < touched_.size(); ++word) {
      uint64_t bits = touched_[word];
      touched_[word] = 0;
      for (; bits != 0; bits &= bits - 1) {
        const int64_t col = int64_t(word) * 64 + __builtin_ctzll(bits);
        out_cols[size] = col;
        out_values[size++] = sums_[col];
        sums_[col] = 0.f;
      }
    }
    return size;
  }

 private:
  std::vector<float> sums_;
  std::vector<uint64_t> touched_;
};

// Row i of the result: W (A + A^T) over sources[i, :] weighted by weights[i, :] (PropagatedRow), then
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
    return [&, row = PropagatedRow(N)](int64_t i, CsrEntries& out) mutable {
      const int64_t* sources = sp + i * k2;
      int64_t most = 0;  // a row holds at most its sources' entries in A and A^T together
      for (int64_t t = 0; t < k2; ++t)
        most += rp[sources[t] + 1] - rp[sources[t]] + tp[sources[t] + 1] - tp[sources[t]];
      return append_row(out, most, [&](int64_t* cols, float* values) {
        for (int64_t t = 0; t < k2; ++t) {
          const int64_t n = sources[t];
          row.add_source(cp, vp, rp[n], rp[n + 1], tc, tv, tp[n], tp[n + 1], wp[i * k2 + t]);
        }
        const int64_t size = row.drain(cols, values);
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
