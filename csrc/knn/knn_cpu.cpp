// CPU kernels of the fused distance + top-k op: GEMM tiles (at::mm, one MKL call per tile and
// thread) into a per-thread buffer, then each tile's values offered to per-row sorted lists
// (knn_math.h). Nothing larger than a tile is ever materialised.
//
//   knn:      rows of x in blocks, one block per OpenMP task; every block walks all of y.
//   self_knn: one set x against itself; only tiles on or above the diagonal are computed (the
//             matrix is symmetric) and each is offered to its rows and, transposed, to its
//             columns. Lists are per thread (two threads may offer to the same row) and merged
//             at the end, with each row's maximum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <limits>
#include <mutex>
#include <vector>

#include "knn_math.h"
#include "knn_operands.h"
#include "../common/no_autocast.h"

namespace dpm_ops {
namespace knn {
namespace {

constexpr int64_t kRowBlock = 256;     // knn: rows of x per task
constexpr int64_t kColumnBlock = 2048; // knn: columns of y per GEMM tile
constexpr int64_t kSelfTile = 1024;    // self_knn: square tiles
constexpr int64_t kFullRowBatch = 64;  // rows recomputed per GEMM when the margin is not enough

// The OpenMP regions below call ATen (at::empty, at::mm_out) from their own threads: each thread
// takes the caller's thread-local state (grad mode, dispatch-key exclusions, autocast), and an
// exception there is kept and rethrown on the calling thread after the region (it must not escape
// an OpenMP thread).
class RegionErrors {
 public:
  template <class F> bool ok(F&& f) {
    try {
      f();
      return true;
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
      return false;
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr first_;
};

// A contiguous (rows, cols) view on the front of a flat per-thread buffer.
at::Tensor tile_view(at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// dots (rows, cols) -> distances in place, one metric per loop so each loop vectorises.
template <typename A>
void finish_tile(A* dots, int64_t rows, int64_t cols, const A* row_norms, const A* col_norms, Metric metric) {
  for (int64_t r = 0; r < rows; ++r) {
    A* line = dots + r * cols;
    const A xn = row_norms[r];
    switch (metric) {
      case Metric::kCosine:
        for (int64_t c = 0; c < cols; ++c) line[c] = pair_distance(line[c], xn, col_norms[c], Metric::kCosine);
        break;
      case Metric::kSqEuclidean:
        for (int64_t c = 0; c < cols; ++c) line[c] = pair_distance(line[c], xn, col_norms[c], Metric::kSqEuclidean);
        break;
      case Metric::kEuclidean:
        for (int64_t c = 0; c < cols; ++c) line[c] = pair_distance(line[c], xn, col_norms[c], Metric::kEuclidean);
        break;
    }
  }
}

template <typename A>
void knn_impl(const Operand& xs, const Operand& ys, int64_t k, Metric metric, at::Tensor& values, at::Tensor& indices) {
  const int64_t M = xs.rows.size(0), Ny = ys.rows.size(0);
  const A* x_norms = xs.norms.const_data_ptr<A>();
  const A* y_norms = ys.norms.const_data_ptr<A>();
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  const int64_t num_blocks = (M + kRowBlock - 1) / kRowBlock;
  const at::ThreadLocalState caller_state;
  RegionErrors errors;
#pragma omp parallel
  {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor buffer;
    errors.ok([&] { buffer = at::empty({kRowBlock * std::min(kColumnBlock, Ny)}, xs.rows.options()); });
    std::vector<SortedList<A>> lists(kRowBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < num_blocks; ++block) {
      const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, M - r0);
      for (int64_t r = 0; r < nr; ++r)
        lists[r] = SortedList<A>{out_values + (r0 + r) * k, out_indices + (r0 + r) * k, 0, int(k)};
      for (int64_t c0 = 0; c0 < Ny; c0 += kColumnBlock) {
        const int64_t nc = std::min(kColumnBlock, Ny - c0);
        at::Tensor tile;
        if (!errors.ok([&] {
              tile = tile_view(buffer, nr, nc);
              at::mm_out(tile, xs.rows.narrow(0, r0, nr), ys.rows.narrow(0, c0, nc).t());
            }))
          continue;
        A* dots = tile.data_ptr<A>();
        finish_tile(dots, nr, nc, x_norms + r0, y_norms + c0, metric);  // vectorised, sqrt included
        for (int64_t r = 0; r < nr; ++r) {
          SortedList<A>& list = lists[r];
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
    }
  }
  errors.rethrow();
}

// ---------------------------------------------------------------------------------------------
// self_knn

template <typename A> struct ThreadLists {
  std::vector<A> values, limit, row_max;
  std::vector<int64_t> indices;
  std::vector<int> count;
  int64_t capacity;
  ThreadLists(int64_t n, int64_t m)
      : values(n * m), limit(n, std::numeric_limits<A>::infinity()), row_max(n, A(0)), indices(n * m), count(n, 0),
        capacity(m) {}
  // Offers (d, column) to `row`; `limit` is the list's last value once full, so most offers stop at
  // one comparison.
  void offer(int64_t row, A d, int64_t column) {
    if (!(d <= limit[row])) return;
    SortedList<A> list{values.data() + row * capacity, indices.data() + row * capacity, count[row], int(capacity)};
    list.insert(d, column);
    count[row] = list.count;
    if (list.full()) limit[row] = list.last_value();
  }
};

constexpr int64_t kProbe = 32;  // columns tested together before any list is touched

// Maximum of n >= 0 values (0 when empty; distances are >= 0 except cosine's, whose row maximum
// always includes d(i, i) = 0 too), through lanes of partial maxima so it vectorises.
template <typename A> A range_max(const A* v, int64_t n) {
  constexpr int kLanes = 16;
  A lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = v[c + l] > lanes[l] ? v[c + l] : lanes[l];
  A top = A(0);
  for (; c < n; ++c) top = v[c] > top ? v[c] : top;
  for (int l = 0; l < kLanes; ++l) top = lanes[l] > top ? lanes[l] : top;
  return top;
}

// Offers line[first, end) (column ids offset + c) to one row's list, with the row's limit in a
// register: the common case is one well-predicted comparison per value.
template <typename A, typename Lists>
void offer_line(Lists& lists, int64_t row, const A* line, int64_t first, int64_t end, int64_t offset) {
  A limit = lists.limit[row];
  for (int64_t c = first; c < end; ++c) {
    if (line[c] <= limit) {
      lists.offer(row, line[c], offset + c);
      limit = lists.limit[row];
    }
  }
}

template <typename A>
void self_knn_impl(const Operand& xs, int64_t k, int64_t m, Metric metric, bool normalize, int64_t cross_rows,
                 at::Tensor& values, at::Tensor& indices, at::Tensor& row_max, at::Tensor& cross) {
  const int64_t N = xs.rows.size(0);
  const A* norms = xs.norms.const_data_ptr<A>();
  A* cross_out = cross.data_ptr<A>();
  const int64_t cross_cols = N - cross_rows;
  const int64_t num_tiles_1d = (N + kSelfTile - 1) / kSelfTile;
  // Diagonal tiles first: each row then holds candidates from its own tile (re-ID data ordered
  // by identity keeps most neighbours there) before the off-diagonal tiles stream past.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i = 0; i < num_tiles_1d; ++i) tiles.emplace_back(i, i);
  for (int64_t i = 0; i < num_tiles_1d; ++i)
    for (int64_t j = i + 1; j < num_tiles_1d; ++j) tiles.emplace_back(i, j);
  const int num_threads = omp_get_max_threads();
  std::vector<ThreadLists<A>> state;
  state.reserve(num_threads);
  for (int t = 0; t < num_threads; ++t) state.emplace_back(N, m);

  const at::ThreadLocalState caller_state;
  RegionErrors errors;
#pragma omp parallel num_threads(num_threads)
  {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    ThreadLists<A>& own = state[omp_get_thread_num()];
    at::Tensor buffer;
    errors.ok([&] { buffer = at::empty({std::min(kSelfTile, N) * std::min(kSelfTile, N)}, xs.rows.options()); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < int64_t(tiles.size()); ++t) {
      const int64_t r0 = tiles[t].first * kSelfTile, c0 = tiles[t].second * kSelfTile;
      const int64_t nr = std::min(kSelfTile, N - r0), nc = std::min(kSelfTile, N - c0);
      const bool diagonal = r0 == c0;
      at::Tensor tile;
      if (!errors.ok([&] {
            tile = tile_view(buffer, nr, nc);
            at::mm_out(tile, xs.rows.narrow(0, r0, nr), xs.rows.narrow(0, c0, nc).t());
          }))
        continue;
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
    }
  }
  errors.rethrow();

  // Merge the threads' lists; order by (value / row max, index) when normalising.
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  A* max_out = row_max.data_ptr<A>();
  std::vector<char> undecided(N, 0);
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<A> merged_values(m), scaled(m);
    std::vector<int64_t> merged_indices(m);
    for (int64_t row = begin; row < end; ++row) {
      SortedList<A> merged{merged_values.data(), merged_indices.data(), 0, int(m)};
      A top = A(0);
      for (const auto& s : state) {
        top = std::max(top, s.row_max[row]);
        for (int p = 0; p < s.count[row]; ++p) merged.insert(s.values[row * m + p], s.indices[row * m + p]);
      }
      max_out[row] = top;
      if (!normalize) {
        std::copy(merged_values.begin(), merged_values.begin() + k, out_values + row * k);
        std::copy(merged_indices.begin(), merged_indices.begin() + k, out_indices + row * k);
        continue;
      }
      const A scale = top > A(0) ? top : A(1);  // an all-zero row keeps its raw order
      // Re-sort by (scaled value, index): division may merge neighbouring raw values.
      std::vector<int> order(m);
      for (int p = 0; p < m; ++p) {
        order[p] = p;
        scaled[p] = merged_values[p] / scale;
      }
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return pair_less(scaled[a], merged_indices[a], scaled[b], merged_indices[b]);
      });
      for (int64_t p = 0; p < k; ++p) {
        out_values[row * k + p] = merged_values[order[p]];
        out_indices[row * k + p] = merged_indices[order[p]];
      }
      if (m < N && !scaled_order_is_decided(scaled[order[k - 1]], merged_values[m - 1], scale)) undecided[row] = 1;
    }
  });

  // Rare rows where an equal scaled value may sit outside the candidates: recompute them whole.
  std::vector<int64_t> redo;
  for (int64_t row = 0; row < N; ++row)
    if (undecided[row]) redo.push_back(row);
  for (size_t b = 0; b < redo.size(); b += kFullRowBatch) {
    const int64_t count = std::min<int64_t>(kFullRowBatch, redo.size() - b);
    at::Tensor ids = at::from_blob(redo.data() + b, {count}, at::kLong).clone();
    at::Tensor dots = at::mm(xs.rows.index_select(0, ids), xs.rows.t()).contiguous();
    const A* dp = dots.const_data_ptr<A>();
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> list_values(k), raw(N);
      std::vector<int64_t> list_indices(k);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t row = redo[b + p];
        const A scale = max_out[row] > A(0) ? max_out[row] : A(1);
        SortedList<A> list{list_values.data(), list_indices.data(), 0, int(k)};
        for (int64_t c = 0; c < N; ++c) {
          raw[c] = c == row ? A(0) : pair_distance(dp[p * N + c], norms[row], norms[c], metric);
          list.insert(raw[c] / scale, c);
        }
        for (int64_t q = 0; q < k; ++q) {
          out_values[row * k + q] = raw[list_indices[q]];
          out_indices[row * k + q] = list_indices[q];
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                           c10::string_view metric_name) {
  check_knn_args(x, y, k);
  const NoAutocastGuard no_autocast;  // the GEMMs stay in the compute type (the OpenMP threads inherit it)
  const Metric metric = parse_metric(metric_name);
  const at::ScalarType type = compute_type(x.scalar_type() == at::kDouble ? x : y);
  const int64_t M = x.size(0), Ny = y.size(0);
  at::Tensor values = at::empty({M, k}, x.options().dtype(type));
  at::Tensor indices = at::empty({M, k}, x.options().dtype(at::kLong));
  if (M == 0) return {values, indices};
  const Operand xs(x, metric, type), ys(y, metric, type);
  if (type == at::kDouble) knn_impl<double>(xs, ys, k, metric, values, indices);
  else knn_impl<float>(xs, ys, k, metric, values, indices);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_knn_cpu(const at::Tensor& x, int64_t k,
                                                                        c10::string_view metric_name,
                                                                        bool normalize, int64_t cross_rows) {
  check_self_knn_args(x, k, cross_rows);
  const NoAutocastGuard no_autocast;
  const int64_t N = x.size(0);
  const Metric metric = parse_metric(metric_name);
  const at::ScalarType type = compute_type(x);
  const Operand xs(x, metric, type);
  // With normalisation the order is by value / row max, known only at the end: keep a margin.
  const int64_t m = normalize ? std::min(N, k + kTieMargin) : k;
  at::Tensor values = at::empty({N, k}, x.options().dtype(type));
  at::Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  at::Tensor row_max = at::empty({N}, x.options().dtype(type));
  at::Tensor cross = at::empty({cross_rows, N - cross_rows}, x.options().dtype(type));
  if (type == at::kDouble) self_knn_impl<double>(xs, k, m, metric, normalize, cross_rows, values, indices, row_max, cross);
  else self_knn_impl<float>(xs, k, m, metric, normalize, cross_rows, values, indices, row_max, cross);
  return {values, indices, row_max, cross};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpm_ops, CPU, m) {
  m.impl("knn", &knn_cpu);
  m.impl("self_knn", &self_knn_cpu);
}

}  // namespace knn
}  // namespace dpm_ops
