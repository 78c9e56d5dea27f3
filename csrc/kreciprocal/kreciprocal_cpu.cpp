// CPU kernels of the sparse k-reciprocal stages (per-row logic: kreciprocal_math.h). Sets and
// weights are CSR (row_ptr (N + 1), cols ascending per row, values); rows run in parallel, each
// thread with its own scratch, so the Python side issues one call per stage.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/chunked_rows.h"
#include "../common/csr_transpose.h"
#include "../common/host_device.h"
#include "kreciprocal_checks.h"
#include "kreciprocal_math.h"
#include "query_gallery_sums.h"
#include "../common/register_kernels.h"

namespace dpm_ops::kreciprocal {
namespace {

constexpr int64_t kRowGrain = 256;

// expanded_set's membership tests through one mark per item: R(i, k1)'s items carry 2 i, the others
// added to R*(i) 2 i + 1, so that marks left by earlier rows never match.
struct MarkedSets {
  int64_t* mark;  // one per item, -1 at first
  int64_t own_mark = -1;
  void start(int64_t i) { own_mark = 2 * i; }
  void add_own(int64_t v) { mark[v] = own_mark; }
  void add_out(int64_t v) { mark[v] = own_mark + 1; }
  bool is_own(const int64_t*, int64_t, int64_t v) const { return mark[v] == own_mark; }
  bool in_out(const int64_t*, int64_t, int64_t v) const { return mark[v] == own_mark || mark[v] == own_mark + 1; }
};

// R*(i) for every item, as CSR (row_ptr, cols). R(c, kh) is computed once per item.
std::tuple<at::Tensor, at::Tensor> expand_cpu(const at::Tensor& neighbours_in, int64_t k1, int64_t half_k1) {
  const ExpandArgs a(neighbours_in, k1, half_k1);
  const int64_t N = a.N, width = a.width, count1 = a.count1, count_h = a.count_h;
  const int64_t* nb = a.neighbours.const_data_ptr<int64_t>();
  std::vector<int64_t> half_sets(N * count_h), half_sizes(N);
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      half_sizes[c] = reciprocal_set(nb, width, c, count_h, half_sets.data() + c * count_h);
  });
  const auto sets = rows_by_chunks<std::vector<int64_t>>(N, kRowGrain, a.neighbours.options(), [&] {
    return [&, own = std::vector<int64_t>(count1), out = std::vector<int64_t>(count1 * (count_h + 1)),
            marks = std::vector<int64_t>(N, -1)](int64_t i, std::vector<int64_t>& items) mutable {
      const int64_t size = expanded_set(nb, width, i, count1, count_h, half_sets.data(), half_sizes.data(),
                                        own.data(), out.data(), MarkedSets{marks.data()});
      items.insert(items.end(), out.begin(), out.begin() + size);
      return size;
    };
  });
  const int64_t* rp = sets.row_ptr.const_data_ptr<int64_t>();
  at::Tensor cols = at::empty({rp[N]}, a.neighbours.options());
  gather_chunks(sets, [](const std::vector<int64_t>& items) -> const auto& { return items; }, cols.data_ptr<int64_t>());
  return {sets.row_ptr, cols};
}

// a_j . b_j for `count` <= kChains pairs of (D) rows, each summed in feature order one add_rn of a
// mul_rn at a time (pair_sqdist's sums, bit for bit); the pairs' chains are independent, so their
// additions' latencies overlap (a full group's fixed count keeps its sums in registers).
constexpr int kChains = 8;
template <typename A> void feature_order_dots(const A* const* a, const A* const* b, int count, int64_t D, A* out) {
  A sums[kChains] = {};
  if (count == kChains) {
    for (int64_t d = 0; d < D; ++d)
      for (int j = 0; j < kChains; ++j) sums[j] = add_rn(sums[j], mul_rn(a[j][d], b[j][d]));
  } else {
    for (int64_t d = 0; d < D; ++d)
      for (int j = 0; j < count; ++j) sums[j] = add_rn(sums[j], mul_rn(a[j][d], b[j][d]));
  }
  std::copy(sums, sums + count, out);
}

// Squared Euclidean distance of every (row, col) entry of a CSR, as float32: pair_sqdist's numbers
// (kreciprocal_math.h), with the features' squared norms summed once per item and the pairs that
// no candidate list holds computed kChains at a time.
template <typename A>
void pair_sqdist_impl(const at::Tensor& features, const at::Tensor& cand_values, const at::Tensor& cand_indices,
                      const at::Tensor& row_ptr, const at::Tensor& cols, at::Tensor& out) {
  const int64_t N = features.size(0), D = features.size(1), m = cand_indices.size(1);
  const A* x = features.const_data_ptr<A>();
  const float* cv = cand_values.const_data_ptr<float>();
  const int64_t* ci = cand_indices.const_data_ptr<int64_t>();
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = cols.const_data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  std::vector<A> norms(N);
  at::parallel_for(0, (N + kChains - 1) / kChains, kRowGrain / kChains, [&](int64_t begin, int64_t end) {
    const A* rows[kChains];
    for (int64_t group = begin; group < end; ++group) {
      const int count = int(std::min<int64_t>(kChains, N - group * kChains));
      for (int j = 0; j < count; ++j) rows[j] = x + (group * kChains + j) * D;
      feature_order_dots(rows, rows, count, D, norms.data() + group * kChains);
    }
  });
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    const A* a[kChains];
    const A* b[kChains];
    int64_t entry[kChains], row[kChains];
    A dots[kChains];
    int count = 0;
    const auto flush = [&] {
      feature_order_dots(a, b, count, D, dots);
      for (int j = 0; j < count; ++j) op[entry[j]] = sqdist_from_sums(dots[j], norms[row[j]], norms[cp[entry[j]]]);
      count = 0;
    };
    for (int64_t r = begin; r < end; ++r)
      for (int64_t e = rp[r]; e < rp[r + 1]; ++e) {
        if (listed_sqdist(cv, ci, m, r, cp[e], op + e)) continue;
        a[count] = x + r * D;
        b[count] = x + cp[e] * D;
        row[count] = r;
        entry[count++] = e;
        if (count == kChains) flush();
      }
    if (count > 0) flush();
  });
}

at::Tensor pair_sqdist_cpu(const at::Tensor& features_in, const at::Tensor& cand_values_in,
                           const at::Tensor& cand_indices_in, const at::Tensor& row_ptr_in, const at::Tensor& cols_in) {
  const PairSqdistArgs a(features_in, cand_values_in, cand_indices_in, row_ptr_in, cols_in);
  at::Tensor out = at::empty({a.cols.size(0)}, a.cols.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(a.features.scalar_type(), "pair_sqdist", [&] {
    pair_sqdist_impl<scalar_t>(a.features, a.cand_values, a.cand_indices, a.row_ptr, a.cols, out);
  });
  return out;
}

// V_qe[i] = mean of the rows V[sources[i, t]], t < sources.shape[1], summed in t order (as numpy's
// mean over axis 0) in float32, then divided by the count. CSR in, CSR out (cols ascending).
std::tuple<at::Tensor, at::Tensor, at::Tensor> query_expansion_cpu(const at::Tensor& row_ptr_in,
                                                                   const at::Tensor& cols_in,
                                                                   const at::Tensor& values_in,
                                                                   const at::Tensor& sources_in) {
  const QueryExpansionArgs a(row_ptr_in, cols_in, values_in, sources_in);
  const int64_t N = a.N, k2 = a.k2;
  const int64_t* rp = a.row_ptr.const_data_ptr<int64_t>();
  const int64_t* cp = a.cols.const_data_ptr<int64_t>();
  const float* vp = a.values.const_data_ptr<float>();
  const int64_t* sp = a.sources.const_data_ptr<int64_t>();
  // expansion_row of kreciprocal_math.h: a row holds at most its sources' entries together.
  const auto rows = rows_by_chunks<CsrEntries>(N, kRowGrain, a.row_ptr.options(), [&] {
    return [&, cursor = std::vector<int64_t>(2 * k2)](int64_t i, CsrEntries& out) mutable {
      const int64_t* sources = sp + i * k2;
      int64_t most = 0;
      for (int64_t t = 0; t < k2; ++t) most += rp[sources[t] + 1] - rp[sources[t]];
      return append_row(out, most, [&](int64_t* cols, float* values) {
        return expansion_row(rp, cp, vp, sources, k2, cursor.data(), cols, values);
      });
    };
  });
  return csr_of(rows, a.row_ptr.options());
}

// out (Q, G) holds the normalised query-gallery distance d (or, with row_scale, the distance
// before its division by row_scale[q], done here in float32 as the reference does); overwritten in place by
// (1 - lambda) Jaccard + lambda d with m(q, g) = sum_k min(V[q, k], V[Q + g, k]), found through an
// inverted index (the gallery rows of every column) and summed per pair in the query's column
// order, as the reference does.
void jaccard_blend_cpu(at::Tensor& out, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                       const at::Tensor& values_in, double lambda_value, const c10::optional<at::Tensor>& scale_in) {
  const JaccardArgs a(out, row_ptr_in, cols_in, values_in, scale_in);
  query_gallery_sums(a, out.data_ptr<float>(), MinShare{},
                     JaccardFinish{a.scale_or_null(), float(1.0 - lambda_value), float(lambda_value)});
}

}  // namespace

DPM_OPS_KERNELS(CPU,
                "kreciprocal_expand", &expand_cpu,
                "kreciprocal_pair_sqdist", &pair_sqdist_cpu,
                "kreciprocal_query_expansion", &query_expansion_cpu,
                "kreciprocal_jaccard_blend_", &jaccard_blend_cpu)

}  // namespace dpm_ops::kreciprocal
