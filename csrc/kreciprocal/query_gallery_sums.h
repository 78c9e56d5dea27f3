// The query x gallery sums of the sparse re-ranking stages, on the CPU (the CUDA kernel:
// query_gallery_sums.cuh): for every query row q < Q of a CSR over N = Q + G items and every gallery
// item g, s(q, g) = the sum over q's entries (c, v), in q's column order, of share(v, w) for each gallery
// row g holding column c with value w (the inverted index `gallery`, ../common/csr_transpose.h); then
// out[q, g] = finish(q, s(q, g), out[q, g]) in place. k-reciprocal's Jaccard (share: min, finish: the
// blend with the distance) and GNN re-ranking's propagated similarity (share: product, finish: the blend
// with the cosine) are the two instances. Query rows run in parallel, each thread with G sums of its own.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "../common/csr_checks.h"
#include "../common/csr_transpose.h"
#include "kreciprocal_math.h"

namespace dpm_ops::kreciprocal {

template <class Share, class Finish>
void query_gallery_sums(const QueryGalleryCsr& a, float* out, Share share, Finish finish) {
  const int64_t Q = a.Q, G = a.G;
  const int64_t* row_ptr = a.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cols = a.cols.const_data_ptr<int64_t>();
  const float* values = a.values.const_data_ptr<float>();
  const CsrTranspose gallery = transpose_rows(a.row_ptr, a.cols, a.values, Q, a.N, a.N);
  const int64_t* column_start = gallery.col_ptr.const_data_ptr<int64_t>();
  const int64_t* holder = gallery.rows.const_data_ptr<int64_t>();
  const float* holder_value = gallery.values.const_data_ptr<float>();
  at::parallel_for(0, Q, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(G, 0.f);
    for (int64_t q = begin; q < end; ++q) {
      for (int64_t e = row_ptr[q]; e < row_ptr[q + 1]; ++e) {
        const int64_t c = cols[e];
        const float v = values[e];
        for (int64_t s = column_start[c]; s < column_start[c + 1]; ++s)
          sums[holder[s]] = add_rn(sums[holder[s]], share(v, holder_value[s]));
      }
      float* row = out + q * G;
      for (int64_t g = 0; g < G; ++g) {
        row[g] = finish(q, sums[g], row[g]);
        sums[g] = 0.f;
      }
    }
  });
}

}  // namespace dpm_ops::kreciprocal
