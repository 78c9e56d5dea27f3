// CPU construction of CSR matrices whose rows' sizes are known only once the rows are computed
// (the sparse re-ranking stages' outputs), in one parallel pass.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace dpm_ops {

// row_ptr = [0, cumsum(counts)] as an int64 tensor.
inline at::Tensor prefix_sum(const std::vector<int64_t>& counts, const at::TensorOptions& options) {
  at::Tensor row_ptr = at::empty({int64_t(counts.size()) + 1}, options.dtype(at::kLong));
  int64_t* p = row_ptr.data_ptr<int64_t>();
  p[0] = 0;
  for (size_t i = 0; i < counts.size(); ++i) p[i + 1] = p[i] + counts[i];
  return row_ptr;
}

// A CSR whose rows' sizes are known only once they are computed, in one pass: each parallel chunk of
// rows appends its rows to buffers of its own (row(i, buffers) returns row i's size; make_row gives a
// chunk its row function with its scratch), and the caller then copies each chunk's buffers to
// row_ptr[first row] of its outputs.
template <typename Buffers> struct ChunkedRows {
  at::Tensor row_ptr;
  std::vector<std::pair<int64_t, Buffers>> chunks;  // (first row, its rows' items)
};
template <typename Buffers, class MakeRow>
ChunkedRows<Buffers> rows_by_chunks(int64_t N, int64_t grain, const at::TensorOptions& options, MakeRow make_row) {
  std::vector<int64_t> sizes(N);
  std::mutex lock;
  ChunkedRows<Buffers> out;
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    Buffers buffers;
    auto row = make_row();
    for (int64_t i = begin; i < end; ++i) sizes[i] = row(i, buffers);
    const std::lock_guard<std::mutex> guard(lock);
    out.chunks.emplace_back(begin, std::move(buffers));
  });
  out.row_ptr = prefix_sum(sizes, options);
  return out;
}

// Copies each chunk's items (a member vector of its Buffers, picked by `items`) to `out` at the chunk's
// first row.
template <typename Buffers, typename T, class Items>
void gather_chunks(const ChunkedRows<Buffers>& rows, Items items, T* out) {
  const int64_t* row_ptr = rows.row_ptr.template const_data_ptr<int64_t>();
  for (const auto& [first, buffers] : rows.chunks) {
    const auto& chunk = items(buffers);
    std::copy(chunk.begin(), chunk.end(), out + row_ptr[first]);
  }
}

// A chunk's rows of a CSR with values: the buffers of rows_by_chunks<CsrEntries>.
struct CsrEntries {
  std::vector<int64_t> cols;
  std::vector<float> values;
};

// Appends one row of at most `most` entries to a chunk's CsrEntries: write(cols, values) writes the row
// there and returns its size, to which the buffers are then cut back. Returns the size.
template <class Write> int64_t append_row(CsrEntries& out, int64_t most, Write write) {
  const size_t start = out.cols.size();
  out.cols.resize(start + most);
  out.values.resize(start + most);
  const int64_t size = write(out.cols.data() + start, out.values.data() + start);
  out.cols.resize(start + size);
  out.values.resize(start + size);
  return size;
}

// (row_ptr, cols, values) of a CSR built by rows_by_chunks<CsrEntries>.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_of(const ChunkedRows<CsrEntries>& rows,
                                                             const at::TensorOptions& options) {
  const int64_t nnz = rows.row_ptr.const_data_ptr<int64_t>()[rows.row_ptr.size(0) - 1];
  at::Tensor cols = at::empty({nnz}, options.dtype(at::kLong)), values = at::empty({nnz}, options.dtype(at::kFloat));
  gather_chunks(rows, [](const CsrEntries& entries) -> const auto& { return entries.cols; }, cols.data_ptr<int64_t>());
  gather_chunks(rows, [](const CsrEntries& entries) -> const auto& { return entries.values; },
                values.data_ptr<float>());
  return {rows.row_ptr, cols, values};
}

}  // namespace dpm_ops
