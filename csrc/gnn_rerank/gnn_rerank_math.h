// Per-row logic of GNN re-ranking (Zhang et al., "Understanding Image Retrieval Re-Ranking: A Graph
// Neural Network Perspective", as its reference code computes it on dense N x N matrices) on CSR rows,
// shared by the CPU kernels (gnn_rerank_cpu.cpp) and the CUDA kernels (gnn_rerank_kernels.cu): plain
// pointers and caller-owned scratch, no allocation, so both give the same numbers bit for bit.
#pragma once

#include <cstdint>

#include "../common/host_device.h"
#include "../kreciprocal/kreciprocal_math.h"

namespace dpm_ops::gnn_rerank {

using kreciprocal::add_rn;
using kreciprocal::mul_rn;

// One row of the propagation W (A + A^T): sum_t weights[t] * (A + A^T)[sources[t], :], the terms of
// each column added in t order one rounding at a time (the reference's `sum += A[.] * S[.]` loop;
// an absent entry adds the reference's exact 0). A is the CSR (row_ptr, cols, values), A^T the CSR
// of its transpose (t_ptr, t_cols, t_values); both have ascending columns per row, and
// (A + A^T)[n, c] = A[n, c] + A[c, n] is formed before it is weighted, as the reference adds the
// dense matrices first. A 2 k2-way merge of the sources' rows, for the CUDA kernels (the CPU kernel adds
// the same terms in the same order through a dense accumulator: PropagatedRow, gnn_rerank_cpu.cpp);
// cursor: 4 * k2 scratch slots. With out_cols == nullptr it only counts (the CUDA count pass). Returns the
// number of columns of the row.
DPM_HD int64_t propagated_row(const int64_t* row_ptr, const int64_t* cols, const float* values, const int64_t* t_ptr,
                              const int64_t* t_cols, const float* t_values, const int64_t* sources,
                              const float* weights, int64_t k2, int64_t* cursor, int64_t* out_cols,
                              float* out_values) {
  int64_t *a_at = cursor, *a_end = cursor + k2, *t_at = cursor + 2 * k2, *t_end = cursor + 3 * k2;
  for (int64_t t = 0; t < k2; ++t) {
    a_at[t] = row_ptr[sources[t]];
    a_end[t] = row_ptr[sources[t] + 1];
    t_at[t] = t_ptr[sources[t]];
    t_end[t] = t_ptr[sources[t] + 1];
  }
  constexpr int64_t kDone = INT64_MAX;  // above every column: the head of an exhausted row
  int64_t size = 0;
  for (;;) {
    int64_t next = kDone;  // the smallest column not yet merged
    for (int64_t t = 0; t < k2; ++t) {
      const int64_t a_head = a_at[t] < a_end[t] ? cols[a_at[t]] : kDone;
      const int64_t t_head = t_at[t] < t_end[t] ? t_cols[t_at[t]] : kDone;
      next = a_head < next ? a_head : next;
      next = t_head < next ? t_head : next;
    }
    if (next == kDone) return size;
    float sum = 0.f;
    for (int64_t t = 0; t < k2; ++t) {
      const bool in_a = a_at[t] < a_end[t] && cols[a_at[t]] == next;
      const bool in_t = t_at[t] < t_end[t] && t_cols[t_at[t]] == next;
      if (!in_a && !in_t) continue;
      if (out_cols != nullptr) {
        const float both = in_a && in_t ? add_rn(values[a_at[t]], t_values[t_at[t]])
                                        : (in_a ? values[a_at[t]] : t_values[t_at[t]]);
        sum = add_rn(sum, mul_rn(both, weights[t]));
      }
      a_at[t] += in_a;
      t_at[t] += in_t;
    }
    if (out_cols != nullptr) {
      out_cols[size] = next;
      out_values[size] = sum;
    }
    ++size;
  }
}

// Divides a row by its L2 norm, as the reference's A.div(torch.norm(A, dim=1)): the squares summed in
// float64 (the correctly rounded norm, whatever order torch's reduction takes), the division in float32.
// A row that is all zeros would give 0 / 0 = NaN there; the callers never make one (every row holds
// its first source's own entries with the weight 1 of its self-similarity).
DPM_HD void normalise_row(float* values, int64_t size) {
  double squares = 0.0;
  for (int64_t p = 0; p < size; ++p) squares += double(values[p]) * double(values[p]);
  const float norm = float(square_root(squares));
  for (int64_t p = 0; p < size; ++p) values[p] = values[p] / norm;
}

// The blended score of one (query, gallery) pair: (1 - lambda) <A_q, A_g> + lambda cos(q, g), in the
// reference's float order ((1 - lamb) * sim + lamb * original_cos, each product rounded).
DPM_HD float blend_score(float similarity, float cosine, float propagated_weight, float cosine_weight) {
  return add_rn(mul_rn(similarity, propagated_weight), mul_rn(cosine, cosine_weight));
}

// The propagated similarity as query_gallery_sums (../kreciprocal/query_gallery_sums.h / .cuh): dot products
// of the query and gallery rows, then the blend with the cosine the output holds.
struct ProductShare {
  DPM_HD float operator()(float query_value, float gallery_value) const { return mul_rn(query_value, gallery_value); }
};
struct BlendFinish {
  float propagated_weight, cosine_weight;
  DPM_HD float operator()(int64_t, float similarity, float cosine) const {
    return blend_score(similarity, cosine, propagated_weight, cosine_weight);
  }
};

}  // namespace dpm_ops::gnn_rerank
