// The CPU machinery shared by the direct (knn_cpu.cpp) and the certified (knn_certified_cpu.cpp)
// distance + top-k: GEMM tiles (at::mm, one MKL call per tile and thread) into a per-thread buffer,
// then each tile's values offered to per-row sorted lists (knn_math.h). Nothing larger than a tile
// is ever materialised.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <omp.h>

#include <algorithm>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "knn_math.h"
#include "knn_operands.h"
#include "../common/no_autocast.h"

namespace dpm_ops::knn {

constexpr int64_t kRowBlock = 256;     // knn: rows of x per task
constexpr int64_t kColumnBlock = 2048; // knn: columns of y per GEMM tile
constexpr int64_t kSelfTile = 1024;    // self_knn: square tiles
constexpr int64_t kProbe = 32;         // columns tested together before any list is touched

// Runs task(scratch, t) for every t in [0, count) on `threads` OpenMP threads, one task at a time
// (dynamic schedule), each thread with its own scratch = make_scratch(its thread number). The tasks
// call ATen (at::empty, at::mm_out) from those threads: each thread takes the caller's thread-local
// state (grad mode, dispatch-key exclusions, autocast), and the first exception thrown is rethrown
// on the calling thread after the region (it must not escape an OpenMP thread; the task that threw
// is abandoned). `threads` is at::get_num_threads(), torch.set_num_threads's count, which it applies to a
// calling thread at its first parallel op: omp_get_max_threads() in a thread that had run none (a
// service's request thread) was OpenMP's default, every core, whatever torch.set_num_threads said.
template <class MakeScratch, class Task>
void parallel_tasks(int64_t count, int threads, MakeScratch make_scratch, Task task) {
  const at::ThreadLocalState caller_state;
  std::mutex mutex;
  std::exception_ptr first;
  const auto guarded = [&](auto&& f) {
    try {
      f();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex);
      if (!first) first = std::current_exception();
    }
  };
#pragma omp parallel num_threads(threads)
  {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    std::optional<decltype(make_scratch(0))> scratch;
    guarded([&] { scratch.emplace(make_scratch(omp_get_thread_num())); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < count; ++t)
      if (scratch) guarded([&] { task(*scratch, t); });
  }
  if (first) std::rethrow_exception(first);
}

// A contiguous (rows, cols) view on the front of a flat per-thread buffer.
inline at::Tensor tile_view(at::Tensor& buffer, int64_t rows, int64_t cols) {
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

// Rows `ids` of x against all of x in the compute type, d(i, i) = 0, in batches of one GEMM each;
// visit(row, distances of the row (N)) runs in parallel over the batch's rows.
template <typename A, class Visit>
void for_full_rows(const Operand& xs, const std::vector<int64_t>& ids, Metric metric, Visit visit) {
  const int64_t N = xs.rows.size(0);
  const A* norms = xs.norms.const_data_ptr<A>();
  for (size_t b = 0; b < ids.size(); b += kFullRowBatch) {
    const int64_t count = std::min<int64_t>(kFullRowBatch, ids.size() - b);
    at::Tensor rows = at::from_blob(const_cast<int64_t*>(ids.data()) + b, {count}, at::kLong).clone();
    at::Tensor dots = at::mm(xs.rows.index_select(0, rows), xs.rows.t()).contiguous();
    A* dp = dots.data_ptr<A>();
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t row = ids[b + p];
        A* line = dp + p * N;
        for (int64_t c = 0; c < N; ++c)
          line[c] = c == row ? A(0) : pair_distance(line[c], norms[row], norms[c], metric);
        visit(row, static_cast<const A*>(line));
      }
    });
  }
}

// One row of self_knn's output from its m smallest (value, index) pairs (sorted) and its maximum:
// the first k, or with `normalize` the first k by (value / row max, index). Returns true when the
// division may have merged the k-th value with one outside the m kept (the row is then recomputed
// whole by recompute_undecided, knn_operands.h).
template <typename A>
bool emit_row(int64_t row, const A* kept_values, const int64_t* kept_indices, int64_t k, int64_t m, int64_t N, A top,
              bool normalize, A* out_values, int64_t* out_indices) {
  if (!normalize) {
    std::copy(kept_values, kept_values + k, out_values + row * k);
    std::copy(kept_indices, kept_indices + k, out_indices + row * k);
    return false;
  }
  const A scale = top > A(0) ? top : A(1);  // an all-zero row keeps its raw order
  // Re-sort by (scaled value, index): division may merge neighbouring raw values.
  std::vector<int> order(m);
  std::vector<A> scaled(m);
  for (int p = 0; p < m; ++p) {
    order[p] = p;
    scaled[p] = kept_values[p] / scale;
  }
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return pair_less(scaled[a], kept_indices[a], scaled[b], kept_indices[b]);
  });
  for (int64_t p = 0; p < k; ++p) {
    out_values[row * k + p] = kept_values[order[p]];
    out_indices[row * k + p] = kept_indices[order[p]];
  }
  return m < N && !scaled_order_is_decided(scaled[order[k - 1]], kept_values[m - 1], scale);
}

// The tiles (i, j), i <= j < count, of a symmetric matrix: the diagonal ones first.
inline std::vector<std::pair<int64_t, int64_t>> upper_tiles(int64_t count) {
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i = 0; i < count; ++i) tiles.emplace_back(i, i);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = i + 1; j < count; ++j) tiles.emplace_back(i, j);
  return tiles;
}

// knn with k a large share of N takes whole rows, partially sorted (knn_cpu.cpp): per-row sorted
// lists would cost O(k) per accepted value.
inline bool prefers_row_sort(int64_t k, int64_t N) { return k >= 128 && 8 * k >= N; }

// The rows r < n with flag(r), as an int64 tensor.
template <class Flag> at::Tensor rows_where(int64_t n, Flag flag) {
  std::vector<int64_t> rows;
  for (int64_t r = 0; r < n; ++r)
    if (flag(r)) rows.push_back(r);
  return at::from_blob(rows.data(), {int64_t(rows.size())}, at::kLong).clone();
}

// A knn call's checked operands in the compute type (the entry points check the arguments first).
struct KnnCall {
  NoAutocastGuard no_autocast;  // the GEMMs stay in the compute type (the OpenMP threads inherit it)
  Metric metric;
  at::ScalarType type;
  Operand xs, ys;
  KnnCall(const at::Tensor& x, const at::Tensor& y, c10::string_view metric_name)
      : metric(parse_metric(metric_name)), type(compute_type(x.scalar_type(), y.scalar_type())), xs(x, metric, type),
        ys(y, metric, type) {}
  // Empty (rows, k) lists: values in the compute type, int64 indices.
  std::tuple<at::Tensor, at::Tensor> lists(int64_t rows, int64_t k) const {
    return {at::empty({rows, k}, xs.rows.options()), at::empty({rows, k}, xs.rows.options().dtype(at::kLong))};
  }
};

// A self_knn call's checked operand in the compute type and its outputs.
struct SelfKnnCall {
  NoAutocastGuard no_autocast;
  Metric metric;
  at::ScalarType type;
  Operand xs;
  int64_t m;  // candidates kept per row: with normalisation the order (value / row max) is known only at the end
  at::Tensor values, indices, row_max, cross;
  SelfKnnCall(const at::Tensor& x, int64_t k, c10::string_view metric_name, bool normalize, int64_t cross_rows)
      : metric(parse_metric(metric_name, "self_knn")), type(compute_type(x.scalar_type())), xs(x, metric, type),
        m(normalize ? std::min(x.size(0), k + kTieMargin) : k) {
    const int64_t N = x.size(0);
    const at::TensorOptions options = xs.rows.options();
    values = at::empty({N, k}, options);
    indices = at::empty({N, k}, options.dtype(at::kLong));
    row_max = at::empty({N}, options);
    cross = at::empty({cross_rows, N - cross_rows}, options);
  }
};

// The direct paths (knn_cpu.cpp), instantiated for float and double.
template <typename A>
void knn_direct(const Operand& xs, const Operand& ys, int64_t k, Metric metric, at::Tensor& values,
                at::Tensor& indices);
template <typename A>
void self_knn_direct(const Operand& xs, int64_t k, int64_t m, Metric metric, bool normalize, int64_t cross_rows,
                     at::Tensor& values, at::Tensor& indices, at::Tensor& row_max, at::Tensor& cross);

}  // namespace dpm_ops::knn
