// CPU kernels of the fused distance + top-k op, direct path (shared machinery: knn_cpu.h).
//
//   knn:      rows of x in blocks, one block per OpenMP task; every block walks all of y.
//   self_knn: one set x against itself; only tiles on or above the diagonal are computed (the
//             matrix is symmetric) and each is offered to its rows and, transposed, to its
//             columns. Lists are per thread (two threads may offer to the same row) and merged
//             at the end, with each row's maximum.
//   knn with k a large share of N: whole rows, partially sorted (knn_row_sort_impl).
// The certified two-stage search is knn_certified_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "knn_cpu.h"
#include "../common/register_kernels.h"

namespace dpm_ops::knn {
namespace {

template <typename A>
void knn_impl(const Operand& xs, const Operand& ys, int64_t k, Metric metric, at::Tensor& values, at::Tensor& indices) {
  const int64_t M = xs.rows.size(0), Ny = ys.rows.size(0);
  const A* x_norms = xs.norms.const_data_ptr<A>();
  const A* y_norms = ys.norms.const_data_ptr<A>();
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  struct Scratch {
    at::Tensor buffer;  // the GEMM tile
    std::vector<SortedList<A>> lists;
  };
  const auto make_scratch = [&](int) {
    return Scratch{at::empty({kRowBlock * std::min(kColumnBlock, Ny)}, xs.rows.options()),
                   std::vector<SortedList<A>>(kRowBlock)};
  };
  parallel_tasks((M + kRowBlock - 1) / kRowBlock, at::get_num_threads(), make_scratch, [&](Scratch& s, int64_t block) {
    const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, M - r0);
    for (int64_t r = 0; r < nr; ++r)
      s.lists[r] = SortedList<A>{out_values + (r0 + r) * k, out_indices + (r0 + r) * k, 0, int(k)};
    for (int64_t c0 = 0; c0 < Ny; c0 += kColumnBlock) {
      const int64_t nc = std::min(kColumnBlock, Ny - c0);
      at::Tensor tile = tile_view(s.buffer, nr, nc);
      at::mm_out(tile, xs.rows.narrow(0, r0, nr), ys.rows.narrow(0, c0, nc).t());
      A* dots = tile.data_ptr<A>();
      finish_tile(dots, nr, nc, x_norms + r0, y_norms + c0, metric);  // vectorised, sqrt included
      for (int64_t r = 0; r < nr; ++r) {
        SortedList<A>& list = s.lists[r];
        const A* row = dots + r * nc;
        // The list's last value in a register: most values stop at one comparison.
        A limit = list.full() ? list.last_value() : std::numeric_limits<A>::infinity();
        for (int64_t c = 0; c < nc; ++c) {
          if (row[c] <= limit) {
            list.insert(row[c], c0 + c);
            if (list.full()) limit = list.last_value();
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// knn with k a large share of N: per-row sorted lists would cost O(k) per accepted value, O(N k)
// a row. Whole rows of distances are computed instead (blocks of rows bounded in memory) and the
// first k taken by a partial sort in (value, index) order: O(N log k) a row.

constexpr int64_t kSortRowElements = int64_t(1) << 22;  // distances held per task

template <typename A>
void knn_row_sort_impl(const Operand& xs, const Operand& ys, int64_t k, Metric metric, at::Tensor& values,
                       at::Tensor& indices) {
  const int64_t M = xs.rows.size(0), Ny = ys.rows.size(0);
  const int64_t block_rows = std::max<int64_t>(1, std::min(kRowBlock, kSortRowElements / Ny));
  const A* x_norms = xs.norms.const_data_ptr<A>();
  const A* y_norms = ys.norms.const_data_ptr<A>();
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  struct Scratch {
    at::Tensor buffer;  // the rows' distances
    std::vector<int64_t> order;
  };
  const auto make_scratch = [&](int) {
    return Scratch{at::empty({block_rows * Ny}, xs.rows.options()), std::vector<int64_t>(Ny)};
  };
  const int64_t num_blocks = (M + block_rows - 1) / block_rows;
  parallel_tasks(num_blocks, at::get_num_threads(), make_scratch, [&](Scratch& s, int64_t block) {
    const int64_t r0 = block * block_rows, nr = std::min(block_rows, M - r0);
    at::Tensor tile = tile_view(s.buffer, nr, Ny);
    at::mm_out(tile, xs.rows.narrow(0, r0, nr), ys.rows.t());
    A* dots = tile.data_ptr<A>();
    finish_tile(dots, nr, Ny, x_norms + r0, y_norms, metric);
    std::vector<int64_t>& order = s.order;
    for (int64_t r = 0; r < nr; ++r) {
      const A* row = dots + r * Ny;
      for (int64_t c = 0; c < Ny; ++c) order[c] = c;
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](int64_t a, int64_t b) { return pair_less(row[a], a, row[b], b); });
      for (int64_t p = 0; p < k; ++p) {
        out_values[(r0 + r) * k + p] = row[order[p]];
        out_indices[(r0 + r) * k + p] = order[p];
      }
    }
  });
}

}  // namespace

template <typename A>
void self_knn_direct(const Operand& xs, int64_t k, int64_t m, Metric metric, bool normalize, int64_t cross_rows,
                     at::Tensor& values, at::Tensor& indices, at::Tensor& row_max, at::Tensor& cross) {
  const int64_t N = xs.rows.size(0);
  const A* norms = xs.norms.const_data_ptr<A>();
  A* cross_out = cross.data_ptr<A>();
  const int64_t cross_cols = N - cross_rows;
  // Diagonal tiles first: each row then holds candidates from its own tile (re-ID data ordered
  // by identity keeps most neighbours there) before the off-diagonal tiles stream past.
  const std::vector<std::pair<int64_t, int64_t>> tiles = upper_tiles((N + kSelfTile - 1) / kSelfTile);
  const int num_threads = at::get_num_threads();
  std::vector<ThreadLists<A>> state;
  state.reserve(num_threads);
  for (int t = 0; t < num_threads; ++t) state.emplace_back(N, m);

  struct Scratch {
    ThreadLists<A>* own;  // the thread's lists
    at::Tensor buffer;    // the GEMM tile
  };
  const auto make_scratch = [&](int thread) {
    return Scratch{&state[thread], at::empty({std::min(kSelfTile, N) * std::min(kSelfTile, N)}, xs.rows.options())};
  };
  parallel_tasks(int64_t(tiles.size()), num_threads, make_scratch, [&](Scratch& s, int64_t t) {
    ThreadLists<A>& own = *s.own;
    const int64_t r0 = tiles[t].first * kSelfTile, c0 = tiles[t].second * kSelfTile;
    const int64_t nr = std::min(kSelfTile, N - r0), nc = std::min(kSelfTile, N - c0);
    const bool diagonal = r0 == c0;
    at::Tensor tile = tile_view(s.buffer, nr, nc);
    at::mm_out(tile, xs.rows.narrow(0, r0, nr), xs.rows.narrow(0, c0, nc).t());
    A* dots = tile.data_ptr<A>();
    finish_tile(dots, nr, nc, norms + r0, norms + c0, metric);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = r0 + r;
      const A* line = dots + r * nc;
      // In a diagonal tile only c > r is used, offered both ways, so d(i, j) and d(j, i) are
      // the same number; d(i, i) is 0.
      const int64_t first = diagonal ? r + 1 : 0;
      own.row_max[row] = std::max(own.row_max[row], range_max(line + first, nc - first));
      offer_line(own, row, line, first, nc, c0);
      if (diagonal) own.offer(row, A(0), row);
      if (row < cross_rows) {
        const int64_t from = std::max(first, cross_rows - c0);
        if (from < nc) std::copy(line + from, line + nc, cross_out + row * cross_cols + (c0 + from - cross_rows));
      }
    }
    // Transposed: each column's list gets the tile's rows. Elementwise maxima vectorise; the
    // candidate test runs on blocks of columns and opens only those with a value under a limit.
    A* column_max = own.row_max.data() + c0;
    const A* column_limit = own.limit.data() + c0;
    for (int64_t r = 0; r < nr; ++r) {
      const A* line = dots + r * nc;
      const int64_t first = diagonal ? r + 1 : 0;
      for (int64_t c = first; c < nc; ++c) column_max[c] = line[c] > column_max[c] ? line[c] : column_max[c];
      for (int64_t c0b = first; c0b < nc; c0b += kProbe) {
        const int64_t c1b = std::min(nc, c0b + kProbe);
        bool any = false;
        for (int64_t c = c0b; c < c1b; ++c) any |= line[c] <= column_limit[c];
        if (!any) continue;
        for (int64_t c = c0b; c < c1b; ++c)
          if (line[c] <= column_limit[c]) own.offer(c0 + c, line[c], r0 + r);
      }
    }
  });

  // Merge the threads' lists; order by (value / row max, index) when normalising.
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  A* max_out = row_max.data_ptr<A>();
  std::vector<char> undecided(N, 0);
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<A> merged_values(m);
    std::vector<int64_t> merged_indices(m);
    for (int64_t row = begin; row < end; ++row) {
      SortedList<A> merged{merged_values.data(), merged_indices.data(), 0, int(m)};
      A top = A(0);
      for (const auto& s : state) {
        top = std::max(top, s.row_max[row]);
        for (int p = 0; p < s.count[row]; ++p) merged.insert(s.values[row * m + p], s.indices[row * m + p]);
      }
      max_out[row] = top;
      undecided[row] = emit_row(row, merged_values.data(), merged_indices.data(), k, m, N, top, normalize,
                                out_values, out_indices);
    }
  });
  recompute_undecided(xs, rows_where(N, [&](int64_t r) { return undecided[r] != 0; }), k, metric, row_max, values,
                      indices);
}

template <typename A>
void knn_direct(const Operand& xs, const Operand& ys, int64_t k, Metric metric, at::Tensor& values,
                at::Tensor& indices) {
  if (prefers_row_sort(k, ys.rows.size(0))) knn_row_sort_impl<A>(xs, ys, k, metric, values, indices);
  else knn_impl<A>(xs, ys, k, metric, values, indices);
}

template void knn_direct<float>(const Operand&, const Operand&, int64_t, Metric, at::Tensor&, at::Tensor&);
template void knn_direct<double>(const Operand&, const Operand&, int64_t, Metric, at::Tensor&, at::Tensor&);
template void self_knn_direct<float>(const Operand&, int64_t, int64_t, Metric, bool, int64_t, at::Tensor&, at::Tensor&,
                                     at::Tensor&, at::Tensor&);
template void self_knn_direct<double>(const Operand&, int64_t, int64_t, Metric, bool, int64_t, at::Tensor&,
                                      at::Tensor&, at::Tensor&, at::Tensor&);

namespace {

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                           c10::string_view metric_name) {
  check_knn_args(x, y, k);
  const KnnCall call(x, y, metric_name);
  at::Tensor values, indices;
  std::tie(values, indices) = call.lists(x.size(0), k);
  if (x.size(0) > 0)
    AT_DISPATCH_FLOATING_TYPES(call.type, "knn", [&] {
      knn_direct<scalar_t>(call.xs, call.ys, k, call.metric, values, indices);
    });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_knn_cpu(const at::Tensor& x, int64_t k,
                                                                        c10::string_view metric_name,
                                                                        bool normalize, int64_t cross_rows) {
  check_self_knn_args(x, k, cross_rows);
  SelfKnnCall call(x, k, metric_name, normalize, cross_rows);
  AT_DISPATCH_FLOATING_TYPES(call.type, "self_knn", [&] {
    self_knn_direct<scalar_t>(call.xs, k, call.m, call.metric, normalize, cross_rows, call.values, call.indices,
                              call.row_max, call.cross);
  });
  return {call.values, call.indices, call.row_max, call.cross};
}

}  // namespace

DPM_OPS_KERNELS(CPU,
                "knn", &knn_cpu,
                "self_knn", &self_knn_cpu)

}  // namespace dpm_ops::knn
