// The transpose of a block of CSR rows (an inverted index: for every column, the rows that hold it),
// on the tensors' own device. Used by the sparse re-ranking stages: the gallery rows of the Jaccard
// and propagated similarities, the A^T of GNN re-ranking's propagation.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace dpm_ops {

// Column c of rows [first, last) of the CSR (row_ptr, cols, values) over columns [0, num_cols):
// rows[col_ptr[c]:col_ptr[c + 1]] (counted from `first`, ascending) and their values. values float32.
struct CsrTranspose {
  at::Tensor col_ptr, rows, values;
};

inline CsrTranspose transpose_rows(const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& values,
                                   int64_t first, int64_t last, int64_t num_cols) {
  const at::TensorOptions index = row_ptr.options();
  if (row_ptr.is_cpu()) {  // a counting sort by column: O(entries), rows stay ascending
    const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
    const int64_t* cp = cols.const_data_ptr<int64_t>();
    const float* vp = values.const_data_ptr<float>();
    at::Tensor col_ptr = at::zeros({num_cols + 1}, index);
    int64_t* start = col_ptr.data_ptr<int64_t>();
    for (int64_t e = rp[first]; e < rp[last]; ++e) ++start[cp[e] + 1];
    for (int64_t c = 0; c < num_cols; ++c) start[c + 1] += start[c];
    at::Tensor rows = at::empty({rp[last] - rp[first]}, index);
    at::Tensor out_values = at::empty({rows.size(0)}, values.options());
    int64_t* rows_p = rows.data_ptr<int64_t>();
    float* values_p = out_values.data_ptr<float>();
    std::vector<int64_t> cursor(start, start + num_cols);
    for (int64_t r = first; r < last; ++r)
      for (int64_t e = rp[r]; e < rp[r + 1]; ++e) {
        const int64_t slot = cursor[cp[e]]++;
        rows_p[slot] = r - first;
        values_p[slot] = vp[e];
      }
    return {col_ptr, rows, out_values};
  }
  // On the GPU: the entries stably sorted by column (rows stay ascending within a column).
  const int64_t begin = row_ptr[first].item<int64_t>(), end = row_ptr[last].item<int64_t>();
  const at::Tensor block_cols = cols.slice(0, begin, end);
  // The index overload (each row repeated |row| times): with a plain int64_t second argument,
  // overload resolution picks repeat_interleave(self, repeats), which repeats every row size instead.
  const at::Tensor block_rows =
      at::repeat_interleave(row_ptr.slice(0, first, last + 1).diff(), std::optional<int64_t>(end - begin));
  const at::Tensor by_column = std::get<1>(block_cols.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::bincount(block_cols, {}, num_cols);
  return {at::cat({at::zeros({1}, index), at::cumsum(counts, 0)}), block_rows.index_select(0, by_column).contiguous(),
          values.slice(0, begin, end).index_select(0, by_column).contiguous()};
}

}  // namespace dpm_ops
