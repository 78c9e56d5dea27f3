// The query x gallery sums of the sparse re-ranking stages, on the CPU (the CUDA kernel:
// query_gallery_sums.cuh): for every query row q < Q of a CSR over N = Q + G items and every gallery
// item g, s(q, g) = the sum over q's entries (c, v), in q's column order, of share(v, w) for each gallery
// row g holding column c with value w (the inverted index `gallery`, ../common/csr_transpose.h); then
// out[q, g] = finish(q, s(q, g), out[q, g]) in place. k-reciprocal's Jaccard (share: min, finish: the
// blend with the distance) and GNN re-ranking's propagated similarity (share: product, finish: the blend
// with the cosine) are the two instances. Blocks of query rows run in parallel, each thread with G sums per
// query of its block.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/csr_checks.h"
#include "../common/csr_transpose.h"
#include "kreciprocal_math.h"

namespace dpm_ops::kreciprocal {

// Query rows summed together: neighbouring queries (the same identity, in a test set's order) share many
// columns, whose holders (the inverted index outgrows the caches) are then read once for all of them. At
// most 8, and as many as keep their sums within kSumsBytes (in the L2 cache: their scattered adds would
// otherwise wait on the L3, which costs more than the shared reads save; MSMT17's 82,161 gallery items
// take one or two).
constexpr int64_t kQueryBlock = 8;
constexpr int64_t kSumsBytes = int64_t(768) << 10;

struct BlockEntry {
  int64_t key;  // column * block + the query's position in the block: the order they are summed in
  float value;
};

template <class Share, class Finish>
void query_gallery_sums(const QueryGalleryCsr& a, float* out, Share share, Finish finish) {
  const int64_t Q = a.Q, G = a.G;
  const int64_t* row_ptr = a.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cols = a.cols.const_data_ptr<int64_t>();
  const float* values = a.values.const_data_ptr<float>();
  const CsrTranspose gallery = transpose_rows(a.row_ptr, a.cols, a.values, Q, a.N, a.N);
  const int64_t* column_start = gallery.col_ptr.const_data_ptr<int64_t>();
  // int32 holders: the products stream 8 bytes each from memory, not 12 (the inverted index outgrows the caches)
  TORCH_CHECK_VALUE(G <= std::numeric_limits<int32_t>::max(), "the sparse re-ranking stages take at most 2^31 - 1 "
                    "gallery items, got ", G);
  const at::Tensor holders = gallery.rows.to(at::kInt);
  const int32_t* holder = holders.const_data_ptr<int32_t>();
  const float* holder_value = gallery.values.const_data_ptr<float>();
  const int64_t block = std::clamp<int64_t>(kSumsBytes / int64_t(sizeof(float) * std::max<int64_t>(G, 1)), 1,
                                            kQueryBlock);
  at::parallel_for(0, Q, block, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(block * G, 0.f);
    std::vector<BlockEntry> entries;
    for (int64_t first = begin; first < end; first += block) {
      const int64_t last = std::min(first + block, end);
      // the block's entries by (column, query): each column's holders read once for all the queries that
      // hold it, and each sum still takes its terms in its query row's column order
      entries.clear();
      for (int64_t q = first; q < last; ++q)
        for (int64_t e = row_ptr[q]; e < row_ptr[q + 1]; ++e)
          entries.push_back({cols[e] * block + (q - first), values[e]});
      std::sort(entries.begin(), entries.end(), [](const BlockEntry& x, const BlockEntry& y) { return x.key < y.key; });
      for (const BlockEntry& entry : entries) {
        const int64_t col = entry.key / block;
        float* query_sums = sums.data() + (entry.key % block) * G;
        for (int64_t s = column_start[col]; s < column_start[col + 1]; ++s)
          query_sums[holder[s]] = add_rn(query_sums[holder[s]], share(entry.value, holder_value[s]));
      }
      for (int64_t q = first; q < last; ++q) {
        float* row = out + q * G;
        float* query_sums = sums.data() + (q - first) * G;
        for (int64_t g = 0; g < G; ++g) {
          row[g] = finish(q, query_sums[g], row[g]);
          query_sums[g] = 0.f;
        }
      }
    }
  });
}

}  // namespace dpm_ops::kreciprocal
