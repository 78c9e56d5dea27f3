// CPU kernels of the certified two-stage distance + top-k (knn_certified / self_knn_certified): the
// direct path's tilings (knn_cpu.h) with an int8 GEMM and per-pair error bounds picking each row's
// candidates (knn_certified_stage1_cpu.h), recomputed in the compute type (docs/certified_knn.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "knn_certified_stage1_cpu.h"
#include "knn_cpu.h"
#include "../common/register_kernels.h"

namespace dpm_ops::knn {
namespace {

// ---------------------------------------------------------------------------------------------
// Certified two-stage search (derivation: docs/certified_knn.md).
//
// Stage 1 (knn_certified_stage1_cpu.h) takes every pair's dot product s from an exact int32 GEMM of
// the rows quantised to int8, with a bound E such that the direct path's dot product p (compute
// type, any summation order) satisfies |s - p| <= E. Every metric's distance is monotone
// non-increasing in the dot product (pair_distance: round(S - 2p) with S fixed, 1 - p, the clamp at
// 0 and the square root, each monotone, as is their rounding), so
//   L = pair_distance(s + E) <= d(i, j) <= U = pair_distance(s - E)
// for the distance d(i, j) that the direct path computes. Per row, every item whose L is <= the
// k-th smallest U is kept (nothing else can be in the first k by (d, index): k items lie at or
// below that U < L); stage 2 recomputes the kept items' distances with the direct path's formula
// in the compute type and selects in (d, index) order. Rows keeping more than `cap` items fall
// back to the direct computation.

constexpr int64_t kCertifiedMinCap = 256;  // candidates per row before the row falls back
constexpr int64_t kCertifiedCapPerK = 8;
constexpr int64_t kStage2Rows = 128;       // self_knn: rows per stage-2 task
constexpr int64_t kLogReserve = 1 << 16;   // entries a stage-1 log reserves at its first offer
constexpr int64_t kSnapshotLines = 16;     // self_knn: lines between refreshes of a tile's column bounds
constexpr double kGuessSlack = 1.1;        // self_knn: a diagonal row's m-th smallest guessed from the last

// Stage 1's per-row bounds, shared by every thread of a call:
// - limit: an m-th smallest upper bound among the row's items (+inf at first); any is valid, so a
//   thread may lower it from what it alone has seen (tighten);
// - uppers: the upper bounds offered at or below the limit, appended to 2m slots (under the row's
//   lock) and cut back to their m smallest when full, which lowers the limit; every upper bound
//   among the row's m smallest is kept, so their m-th smallest at the end is exact (final_limit);
// - top: the largest lower bound among the row's items (for the row maximum).
// Limits only fall and tops only rise; a thread that reads an older value keeps more than it needs,
// never less.
template <typename A> class RowBounds {
 public:
  RowBounds(int64_t rows, int64_t m)
      : limit_(new std::atomic<A>[rows]), top_(new std::atomic<A>[rows]), locks_(new std::atomic_flag[rows]),
        counts_(new std::atomic<int>[rows]), uppers_(rows * 2 * m), m_(m) {
    for (int64_t row = 0; row < rows; ++row) {
      limit_[row].store(std::numeric_limits<A>::infinity(), std::memory_order_relaxed);
      top_[row].store(A(0), std::memory_order_relaxed);
      counts_[row].store(0, std::memory_order_relaxed);
      locks_[row].clear(std::memory_order_relaxed);  // before C++20 a new atomic_flag's state is unspecified
    }
  }

  A limit(int64_t row) const { return limit_[row].load(std::memory_order_relaxed); }
  A top(int64_t row) const { return top_[row].load(std::memory_order_relaxed); }

  // Lowers the row's limit to new_limit and raises its top to new_top where they are tighter.
  void tighten(int64_t row, A new_limit, A new_top) {
    A old = limit(row);
    while (new_limit < old && !limit_[row].compare_exchange_weak(old, new_limit, std::memory_order_relaxed)) {}
    old = top(row);
    while (new_top > old && !top_[row].compare_exchange_weak(old, new_top, std::memory_order_relaxed)) {}
  }

  // Appends `up` to the row's slots if it is still at or below the limit.
  void add_upper(int64_t row, A up) {
    while (locks_[row].test_and_set(std::memory_order_acquire)) {}
    A* kept = uppers_.data() + row * 2 * m_;
    if (up <= limit(row)) {
      const int count = counts_[row].load(std::memory_order_relaxed);
      kept[count] = up;
      if (count + 1 < 2 * m_) {
        counts_[row].store(count + 1, std::memory_order_relaxed);
      } else {
        std::nth_element(kept, kept + (m_ - 1), kept + 2 * m_);
        counts_[row].store(int(m_), std::memory_order_relaxed);
        tighten(row, kept[m_ - 1], A(0));
      }
    }
    locks_[row].clear(std::memory_order_release);
  }

  // Brings the slot the row's next upper bound goes to into the cache.
  void prefetch(int64_t row) const {
    __builtin_prefetch(uppers_.data() + row * 2 * m_ + counts_[row].load(std::memory_order_relaxed), 1);
  }

  // The m-th smallest of the row's kept upper bounds (once no thread adds to them; +inf with fewer
  // than m), selected in `buffer`.
  A final_limit(int64_t row, std::vector<A>& buffer) const {
    const A* kept = uppers_.data() + row * 2 * m_;
    buffer.assign(kept, kept + counts_[row].load(std::memory_order_relaxed));
    return mth_value(buffer, m_);
  }

 private:
  std::unique_ptr<std::atomic<A>[]> limit_, top_;
  std::unique_ptr<std::atomic_flag[]> locks_;
  std::unique_ptr<std::atomic<int>[]> counts_;  // written under the row's lock, read by prefetch too
  std::vector<A> uppers_;
  int64_t m_;
};

// One thread's stage-1 log against the shared bounds: the items offered to a row whose lower bound
// was <= the row's limit (near candidates) or, for the row maximum, whose upper bound was >= its
// top, in the order offered. Appending is a sequential write, where per-row lists missed the cache
// on nearly every offer. When the log is full, the items the bounds no longer want are dropped (a
// log still over half full then doubles, so each compaction is paid for by as many appends); a row
// with more than 2 cap items left is marked (overflow) and left to the direct path, which bounds the
// log. Rows and items are int32 (calls with more rows take the direct path: fits_log).
template <typename A> struct CertifiedLog {
  struct Entry {
    A lower, upper;
    int32_t row, index;
  };
  RowBounds<A>* bounds;
  std::vector<Entry> entries;
  std::vector<char> overflow;
  std::vector<int32_t> live;         // compact's per-row counts
  std::vector<int64_t> hit_columns;  // offer_to_columns' buffer
  int64_t cap;
  bool track_max;
  CertifiedLog(RowBounds<A>& bounds, int64_t rows, int64_t cap, bool track_max)
      : bounds(&bounds), overflow(rows, 0), live(rows, 0), cap(cap), track_max(track_max) {}

  bool wants(int64_t row, A lower, A up) const {
    return lower <= bounds->limit(row) || (track_max && up >= bounds->top(row));
  }

  // One tile line's items [first, end) with a row hit (stage1_line) offered to `row` (items offset + c).
  void offer_to_row(int64_t row, const A* lo, const A* up, const uint64_t* hits, int64_t first, int64_t end,
                    int64_t offset) {
    for_each_hit(hits, first, end, [&](int64_t c) {
      if (wants(row, lo[c], up[c])) offer(row, lo[c], up[c], offset + c);
    });
  }

  // The same line offered transposed where it has a column hit: column c to row offset + c, as item
  // `index`. Those rows' upper-bound slots lie scattered in memory: they are prefetched first, so
  // that the cache misses overlap.
  void offer_to_columns(int64_t index, const A* lo, const A* up, const uint64_t* hits, int64_t first, int64_t end,
                        int64_t offset) {
    hit_columns.clear();
    for_each_hit(hits, first, end, [&](int64_t c) { hit_columns.push_back(c); });
    for (const int64_t c : hit_columns) bounds->prefetch(offset + c);
    for (const int64_t c : hit_columns)
      if (wants(offset + c, lo[c], up[c])) offer(offset + c, lo[c], up[c], index);
  }

  // After an overflow only the upper bounds are still collected (their limit is what a rescan of
  // the row needs).
  void offer(int64_t row, A lower, A up, int64_t index) {
    if (up <= bounds->limit(row)) bounds->add_upper(row, up);
    if (overflow[row]) return;
    if (track_max) bounds->tighten(row, std::numeric_limits<A>::infinity(), lower);
    if (!wants(row, lower, up)) return;
    if (entries.size() == entries.capacity()) compact();
    entries.push_back({lower, up, int32_t(row), int32_t(index)});
  }

 private:
  void compact() {
    if (entries.empty()) {
      entries.reserve(kLogReserve);
      return;
    }
    const auto dropped = [&](const Entry& e) { return overflow[e.row] || !wants(e.row, e.lower, e.upper); };
    entries.erase(std::remove_if(entries.begin(), entries.end(), dropped), entries.end());
    bool over = false;
    for (const Entry& e : entries) over |= ++live[e.row] > 2 * cap;
    for (const Entry& e : entries) {
      if (live[e.row] > 2 * cap) overflow[e.row] = 1;
      live[e.row] = 0;
    }
    if (over) entries.erase(std::remove_if(entries.begin(), entries.end(), dropped), entries.end());
    if (2 * entries.size() > entries.capacity()) entries.reserve(2 * entries.capacity());
  }
};

// Whether a call's rows fit CertifiedLog's int32 rows and items.
inline bool fits_log(int64_t rows) { return rows <= std::numeric_limits<int32_t>::max(); }

// The logged entries of every row of [0, rows) that keep(row, lower, upper) accepts, grouped by row:
// a counting sort of the logs, each log counted and scattered by a thread of its own (the logs are
// freed). Stage 2 passes its final limits, by which ~55% of what the logs still hold are dropped
// before they are moved (Market-scale re-ranking: 1.93 M entries, 0.88 M grouped). The grouped
// entries are left uninitialised until scattered, so that their first touch is parallel too.
template <typename A> struct RowEntries {
  struct Entry {
    A lower, upper;
    int32_t index;
  };
  template <class Keep>
  RowEntries(const std::vector<CertifiedLog<A>*>& logs, int64_t rows, Keep keep) : start_(rows + 1, 0) {
    const int64_t count = int64_t(logs.size());
    // Per log: its kept entries per row, then where its next entry of each row goes.
    std::vector<std::vector<int64_t>> next(count, std::vector<int64_t>(rows, 0));
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l)
        for (const auto& e : logs[l]->entries) next[l][e.row] += keep(e.row, e.lower, e.upper);
    });
    int64_t total = 0;
    for (int64_t r = 0; r < rows; ++r) {
      start_[r] = total;
      for (auto& position : next) total += std::exchange(position[r], total);
    }
    start_[rows] = total;
    entries_.reset(new Entry[total]);
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l) {
        for (const auto& e : logs[l]->entries)
          if (keep(e.row, e.lower, e.upper)) entries_[next[l][e.row]++] = {e.lower, e.upper, e.index};
        decltype(logs[l]->entries)().swap(logs[l]->entries);
      }
    });
  }
  const Entry* begin(int64_t row) const { return entries_.get() + start_[row]; }
  const Entry* end(int64_t row) const { return entries_.get() + start_[row + 1]; }

 private:
  std::vector<int64_t> start_;
  std::unique_ptr<Entry[]> entries_;
};

// The direct path's dot products of row a with the rows b[0, kRows) in the compute type: for each,
// lanes of partial sums four AVX-512 registers wide (independent FMA chains), so that it vectorises
// (with FMA in the AVX-512 build); the same arithmetic for every kRows, and symmetric in a and b bit
// for bit. Several rows at once overlap their loads from memory, which bound stage 2.
template <int kRows, typename A>
[[gnu::always_inline]] inline void row_dots_fixed(const A* __restrict a, const A* const* b, int64_t D, A* out) {
  constexpr int kLanes = 256 / sizeof(A);
  A lanes[kRows][kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int j = 0; j < kRows; ++j)
      for (int l = 0; l < kLanes; ++l) lanes[j][l] += a[d + l] * b[j][d + l];
  for (int j = 0; j < kRows; ++j) {
    A sum = A(0);
    for (int64_t t = d; t < D; ++t) sum += a[t] * b[j][t];
    for (int l = 0; l < kLanes; ++l) sum += lanes[j][l];
    out[j] = sum;
  }
}
constexpr int kDotRows = 4;  // rows per row_dots call
template <typename A>
[[gnu::always_inline]] inline void row_dots_body(const A* a, const A* const* b, int count, int64_t D, A* out) {
  switch (count) {
    case 1: return row_dots_fixed<1>(a, b, D, out);
    case 2: return row_dots_fixed<2>(a, b, D, out);
    case 3: return row_dots_fixed<3>(a, b, D, out);
    default: return row_dots_fixed<4>(a, b, D, out);
  }
}
template <typename A> void row_dots_portable(const A* a, const A* const* b, int count, int64_t D, A* out) {
  row_dots_body(a, b, count, D, out);
}
template <typename A>
DPM_OPS_AVX512_TARGET void row_dots_avx512(const A* a, const A* const* b, int count, int64_t D, A* out) {
  row_dots_body(a, b, count, D, out);
}

// A stage-2 item of a row: the candidate, and its distance once known (exact from stage 1 or
// computed; until then its lower bound).
template <typename A> struct Stage2Item {
  int64_t index;
  A distance;
  bool known;
};

// The unknown distances of items [first, last) from row x (squared norm x_norm) to rows of y, as the
// direct path computes them (pair_distance of row_dots), kDotRows at a time.
template <typename A>
void fill_distances(Stage2Item<A>* first, Stage2Item<A>* last, const A* x, A x_norm, const A* y_rows,
                    const A* y_norms, int64_t D, Metric metric) {
  Stage2Item<A>* batch[kDotRows];
  const A* rows[kDotRows];
  A dots[kDotRows];
  int count = 0;
  const auto flush = [&] {
    if (has_avx512()) row_dots_avx512(x, rows, count, D, dots);
    else row_dots_portable(x, rows, count, D, dots);
    for (int j = 0; j < count; ++j)
      batch[j]->distance = pair_distance(dots[j], x_norm, y_norms[batch[j]->index], metric);
    count = 0;
  };
  for (Stage2Item<A>* item = first; item < last; ++item) {
    if (item->known) continue;
    batch[count] = item;
    rows[count++] = y_rows + item->index * D;
    if (count == kDotRows) flush();
  }
  if (count > 0) flush();
}

// The smallest (distance, index) pairs of the near candidates `items` into `list`: the known
// distances first, then the others in ascending lower bound, kDotRows at a time, until the next
// lower bound is above the list's last value (no item left can enter: its distance is at least its
// lower bound). Those items' distances are never computed: 17% of the unknown ones at Market
// scale (105 k of 626 k a call).
template <typename A>
void select_nearest(std::vector<Stage2Item<A>>& items, SortedList<A>& list, const A* x, A x_norm, const A* y_rows,
                    const A* y_norms, int64_t D, Metric metric) {
  const auto unknown = std::partition(items.begin(), items.end(), [](const Stage2Item<A>& i) { return i.known; });
  for (auto item = items.begin(); item != unknown; ++item) list.insert(item->distance, item->index);
  const auto by_lower = [](const Stage2Item<A>& a, const Stage2Item<A>& b) { return a.distance < b.distance; };
  std::sort(unknown, items.end(), by_lower);
  for (auto batch = unknown; batch != items.end();) {
    if (list.full() && batch->distance > list.last_value()) break;
    const auto batch_end = batch + std::min<int64_t>(kDotRows, items.end() - batch);
    fill_distances(&*batch, &*batch + (batch_end - batch), x, x_norm, y_rows, y_norms, D, metric);
    for (auto item = batch; item != batch_end; ++item) list.insert(item->distance, item->index);
    batch = batch_end;
  }
}

int64_t certified_cap(int64_t k, int64_t N) { return std::min(N, std::max(kCertifiedMinCap, kCertifiedCapPerK * k)); }

// One stage-1 + stage-2 pass over the rows of xs. `limits` holds each row's starting threshold
// (+inf, or a rescan's known final one) and gets the final one (the k-th smallest upper bound).
// counts: the row's candidates; -2 where its logged items overflowed while the threshold was still
// falling (a rescan from the final threshold may keep fewer), -1 where the final set is over the cap.
template <typename A>
void knn_certified_pass(const Operand& xs, const Operand& ys, const Stage1Rows<A>& xq, const Stage1Rows<A>& yq,
                        int64_t k, Metric metric, std::vector<A>& limits, at::Tensor& values, at::Tensor& indices,
                        at::Tensor& counts) {
  const int64_t M = xs.rows.size(0), Ny = ys.rows.size(0), D = xs.rows.size(1);
  const int64_t cap = certified_cap(k, Ny);
  const A* x_norms = xs.norms.const_data_ptr<A>();
  const A* y_norms = ys.norms.const_data_ptr<A>();
  const A* x_rows = xs.rows.const_data_ptr<A>();
  const A* y_rows = ys.rows.const_data_ptr<A>();
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  int64_t* out_counts = counts.data_ptr<int64_t>();
  const A no_top = std::numeric_limits<A>::infinity();  // knn keeps no row maximum
  const auto make_scratch = [&](int) { return Stage1Scratch<A>(std::min(kRowBlock, M), std::min(kColumnBlock, Ny)); };
  std::vector<int64_t> column_edges;
  for (int64_t c0 = 0; c0 < Ny; c0 += kColumnBlock) column_edges.push_back(c0);
  column_edges.push_back(Ny);
  const std::optional<AmxColumnPanels> packed = yq.column_panels(column_edges);
  const AmxColumnPanels* panels = packed ? &*packed : nullptr;
  parallel_tasks((M + kRowBlock - 1) / kRowBlock, at::get_num_threads(), make_scratch,
                 [&](Stage1Scratch<A>& s, int64_t block) {
    const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, M - r0);
    RowBounds<A> bounds(nr, k);
    for (int64_t r = 0; r < nr; ++r) bounds.tighten(r, limits[r0 + r], A(0));
    CertifiedLog<A> log(bounds, nr, cap, false);
    for (int64_t c0 = 0; c0 < Ny; c0 += kColumnBlock) {
      const int64_t nc = std::min(kColumnBlock, Ny - c0);
      s.begin_tile(xq, r0, nr, yq, c0, nc, panels);
      for (int64_t r = 0; r < nr; ++r) {
        stage1_line<false>(s.line(s.dots(r), nc, metric, xq, r0 + r, x_norms[r0 + r], yq, c0, y_norms,
                                  bounds.limit(r), no_top));
        log.offer_to_row(r, s.lower.data(), s.upper.data(), s.row_words.data(), 0, nc, c0);
      }
    }
    // Stage 2: the kept items' distances as the direct path computes them, in (value, index) order.
    std::vector<A> kept_uppers;
    for (int64_t r = 0; r < nr; ++r) limits[r0 + r] = bounds.final_limit(r, kept_uppers);
    const RowEntries<A> logged({&log}, nr,
                               [&](int64_t r, A lower, A) { return !log.overflow[r] && lower <= limits[r0 + r]; });
    std::vector<Stage2Item<A>> items;
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = r0 + r;
      const A limit = limits[row];
      out_counts[row] = -2;
      if (log.overflow[r]) continue;
      items.clear();
      for (const auto* e = logged.begin(r); e < logged.end(r); ++e)
        if (e->lower <= limit) items.push_back({e->index, e->lower, e->lower == e->upper});
      const int64_t kept = int64_t(items.size());
      out_counts[row] = -1;
      if (kept > cap) continue;
      SortedList<A> list{out_values + row * k, out_indices + row * k, 0, int(k)};
      select_nearest(items, list, x_rows + row * D, x_norms[row], y_rows, y_norms, D, metric);
      out_counts[row] = kept;
    }
  });
}

template <typename A>
void knn_certified_impl(const Operand& xs, const Operand& ys, const Stage1Rows<A>& xq, const Stage1Rows<A>& yq,
                        int64_t k, Metric metric, at::Tensor& values, at::Tensor& indices, at::Tensor& counts) {
  const int64_t M = xs.rows.size(0);
  std::vector<A> limits(M, std::numeric_limits<A>::infinity());
  knn_certified_pass<A>(xs, ys, xq, yq, k, metric, limits, values, indices, counts);
  // Rows whose logged items overflowed while their threshold was still falling: once more from the
  // final threshold (items that arrive early are then not kept for nothing).
  const int64_t* count = counts.const_data_ptr<int64_t>();  // updated in place below
  const at::Tensor rescan = rows_where(M, [&](int64_t r) { return count[r] == -2; });
  if (rescan.numel() > 0) {
    std::vector<A> rescan_limits;
    for (int64_t p = 0; p < rescan.size(0); ++p) rescan_limits.push_back(limits[rescan.const_data_ptr<int64_t>()[p]]);
    at::Tensor part_values = at::empty({rescan.size(0), k}, values.options());
    at::Tensor part_indices = at::empty({rescan.size(0), k}, indices.options());
    at::Tensor part_counts = at::empty({rescan.size(0)}, counts.options());
    knn_certified_pass<A>(xs.take(rescan), ys, xq.take(rescan), yq, k, metric, rescan_limits,
                          part_values, part_indices, part_counts);
    values.index_copy_(0, rescan, part_values);
    indices.index_copy_(0, rescan, part_indices);
    counts.index_copy_(0, rescan, part_counts.clamp_min(-1));  // no third pass
  }
  // Rows left to the direct path.
  const at::Tensor fallback = rows_where(M, [&](int64_t r) { return count[r] < 0; });
  if (fallback.numel() == 0) return;
  at::Tensor direct_values = at::empty({fallback.size(0), k}, values.options());
  at::Tensor direct_indices = at::empty({fallback.size(0), k}, indices.options());
  knn_direct<A>(xs.take(fallback), ys, k, metric, direct_values, direct_indices);
  values.index_copy_(0, fallback, direct_values);
  indices.index_copy_(0, fallback, direct_indices);
}

template <typename A>
void self_knn_certified_impl(const Operand& xs, const Stage1Rows<A>& xq, int64_t k, int64_t m, Metric metric,
                             bool normalize, int64_t cross_rows, at::Tensor& values, at::Tensor& indices,
                             at::Tensor& row_max, at::Tensor& cross, at::Tensor& counts) {
  const int64_t N = xs.rows.size(0), D = xs.rows.size(1);
  const int64_t cap = certified_cap(m, N);
  const A* norms = xs.norms.const_data_ptr<A>();
  const A* rows = xs.rows.const_data_ptr<A>();
  A* cross_out = cross.data_ptr<A>();
  const int64_t cross_cols = N - cross_rows;
  // Tile edges every kSelfTile and at cross_rows: a tile of query rows and gallery columns lies in
  // the cross block, which is needed in the compute type anyway; its GEMM gives exact values
  // (lower = upper) and the int8 GEMM covers the rest.
  std::vector<int64_t> edges;
  for (int64_t e = 0; e < N; e += kSelfTile) edges.push_back(e);
  if (cross_rows > 0 && cross_rows < N) edges.push_back(cross_rows);
  std::sort(edges.begin(), edges.end());
  edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
  edges.push_back(N);
  const int64_t num_edges = int64_t(edges.size()) - 1;
  const std::vector<std::pair<int64_t, int64_t>> tiles = upper_tiles(num_edges);
  const std::optional<AmxColumnPanels> packed = xq.column_panels(edges);
  const AmxColumnPanels* panels = packed ? &*packed : nullptr;
  const int num_threads = at::get_num_threads();
  RowBounds<A> bounds(N, m);
  std::vector<CertifiedLog<A>> logs;
  logs.reserve(num_threads);
  for (int t = 0; t < num_threads; ++t) logs.emplace_back(bounds, N, cap, true);

  struct Scratch {
    CertifiedLog<A>* own;  // the thread's log
    Stage1Scratch<A> stage1;
    at::Tensor buffer;       // a cross tile's GEMM
    std::vector<A> col_limit, col_top;  // the tile's columns' bounds, as last read
  };
  const int64_t side = std::min(kSelfTile, N);
  const auto make_scratch = [&](int thread) {
    return Scratch{&logs[thread], Stage1Scratch<A>(side, side), at::empty({side * side}, xs.rows.options()),
                   std::vector<A>(side), std::vector<A>(side)};
  };
  // Every tile, the diagonal ones first, on one dynamic schedule: the threads share the bounds, so
  // what one finds tightens the hits of the others at once.
  parallel_tasks(int64_t(tiles.size()), num_threads, make_scratch, [&](Scratch& s, int64_t t) {
    CertifiedLog<A>& own = *s.own;
    Stage1Scratch<A>& line = s.stage1;
    const int64_t r0 = edges[tiles[t].first], nr = edges[tiles[t].first + 1] - r0;
    const int64_t c0 = edges[tiles[t].second], nc = edges[tiles[t].second + 1] - c0;
    const bool diagonal = r0 == c0, in_cross = r0 < cross_rows && c0 >= cross_rows;
    const int32_t* dots = nullptr;   // a diagonal tile's int8 GEMM, whole: its lines are read twice
    const A* exact_dots = nullptr;   // the cross block's GEMM, in the compute type
    A* exact = nullptr;              // the cross block's distances (lower = upper), in the output
    if (in_cross) {
      at::Tensor tile = tile_view(s.buffer, nr, nc);
      at::mm_out(tile, xs.rows.narrow(0, r0, nr), xs.rows.narrow(0, c0, nc).t());
      exact_dots = tile.const_data_ptr<A>();
      exact = cross_out + r0 * cross_cols + (c0 - cross_rows);
    } else if (diagonal) {
      dots = line.gemm(xq, r0, nr, xq, c0, nc, panels);
    } else {
      line.begin_tile(xq, r0, nr, xq, c0, nc, panels);  // the others' lines: once, in order
    }
    // A diagonal tile first sets each of its rows' limit and top from the row's whole line (the
    // tile's GEMM is square): the diagonal tiles come first, and a line's hits are taken against
    // the limit at its start, which would otherwise still be +inf.
    // Consecutive rows (an identity's images in ordered data) have similar m-th smallest upper bounds:
    // a row's answer, 10% up, is the next row's guess (on Market-like data >= m values pass it for
    // ~95% of the rows, ~60 values of 1,024).
    if (diagonal) {
      const A none = std::numeric_limits<A>::infinity();
      A guess = none;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        stage1_line<false>(line.line(dots + r * nc, nc, metric, xq, row, norms[row], xq, c0, norms, none, none));
        // d(i, i) is 0, whatever the formula gives for the pair (for cosine, 1 - |x|^2 on a row too short to
        // normalise: a top of ~1 that would leave the row's true maximum out).
        line.lower[r] = line.upper[r] = A(0);
        const A limit = mth_smallest(line.upper.data(), nc, m, line.smallest, r, guess);
        guess = limit * A(kGuessSlack);
        bounds.tighten(row, limit, range_max(line.lower.data(), nc));
      }
    }
    // In a diagonal tile only c > r is used, offered both ways; d(i, i) is 0.
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = r0 + r;
      if (r % kSnapshotLines == 0)
        for (int64_t c = 0; c < nc; ++c) s.col_limit[c] = bounds.limit(c0 + c), s.col_top[c] = bounds.top(c0 + c);
      if (diagonal) own.offer(row, A(0), A(0), row);
      const int64_t first = diagonal ? r + 1 : 0;
      const A* lo = exact ? exact + r * cross_cols : line.lower.data();
      const A* up = exact ? exact + r * cross_cols : line.upper.data();
      if (exact) {
        exact_line<A>({exact_dots + r * nc, nc, metric, norms[row], bounds.limit(row), bounds.top(row), norms + c0,
                       s.col_limit.data(), s.col_top.data(), exact + r * cross_cols, line.row_hits.data(),
                       line.col_hits.data(), line.row_words.data(), line.col_words.data()});
      } else {
        const int32_t* line_dots = diagonal ? dots + r * nc : line.dots(r);
        Stage1Line<A> in = line.line(line_dots, nc, metric, xq, row, norms[row], xq, c0, norms, bounds.limit(row),
                                     bounds.top(row));
        in.col_limit = s.col_limit.data();
        in.col_top = s.col_top.data();
        stage1_line<true>(in.from(first / kHitBlock * kHitBlock));  // for_each_hit starts at first's word
      }
      own.offer_to_row(row, lo, up, line.row_words.data(), first, nc, c0);
      own.offer_to_columns(row, lo, up, line.col_words.data(), first, nc, c0);
    }
  });

  // Each row's final limit, the m-th smallest of its kept upper bounds (exact: final_limit), and
  // whether any log overflowed on it; then the logs' entries that can still matter, grouped by row,
  // and stage 2 per row: the kept items' distances as the direct path computes them, the m smallest
  // in (value, index) order, and the row maximum.
  std::vector<A> limits(N);
  std::vector<char> overflowed(N, 0);
  at::parallel_for(0, N, kStage2Rows, [&](int64_t begin, int64_t end) {
    std::vector<A> uppers;
    for (int64_t row = begin; row < end; ++row) {
      limits[row] = bounds.final_limit(row, uppers);
      for (const auto& log : logs) overflowed[row] |= log.overflow[row];
    }
  });
  std::vector<CertifiedLog<A>*> log_list;
  for (auto& log : logs) log_list.push_back(&log);
  const RowEntries<A> logged(log_list, N, [&](int64_t row, A lower, A upper) {
    return !overflowed[row] && (lower <= limits[row] || upper >= bounds.top(row));
  });
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  A* max_out = row_max.data_ptr<A>();
  int64_t* out_counts = counts.data_ptr<int64_t>();
  std::vector<char> undecided(N, 0), fallback(N, 0);
  // Blocks of rows on a dynamic schedule: query rows, whose gallery candidates are exact, cost less.
  struct Stage2Scratch {
    std::vector<A> kept_values;
    std::vector<int64_t> kept_indices;
    std::vector<Stage2Item<A>> items;
  };
  const auto make_stage2_scratch = [&](int) {
    return Stage2Scratch{std::vector<A>(m), std::vector<int64_t>(m), {}};
  };
  parallel_tasks((N + kStage2Rows - 1) / kStage2Rows, num_threads, make_stage2_scratch,
                 [&](Stage2Scratch& buffers, int64_t block) {
    std::vector<A>& kept_values = buffers.kept_values;
    std::vector<int64_t>& kept_indices = buffers.kept_indices;
    std::vector<Stage2Item<A>>& items = buffers.items;
    for (int64_t row = block * kStage2Rows; row < std::min(N, (block + 1) * kStage2Rows); ++row) {
      const A max_lower = bounds.top(row);
      const A limit = limits[row];
      const auto* first = logged.begin(row);
      const auto* end = logged.end(row);
      items.clear();
      for (const auto* e = first; e < end; ++e)
        if (e->lower <= limit) items.push_back({e->index, e->lower, e->lower == e->upper});
      const int64_t kept = int64_t(items.size());
      if (overflowed[row] || kept > cap) {
        fallback[row] = 1;
        out_counts[row] = -1;
        continue;
      }
      SortedList<A> list{kept_values.data(), kept_indices.data(), 0, int(m)};
      select_nearest(items, list, rows + row * D, norms[row], rows, norms, D, metric);
      // The row maximum: the largest distance among the items that can reach it.
      items.clear();
      for (const auto* e = first; e < end; ++e)
        if (e->upper >= max_lower) items.push_back({e->index, e->lower, e->lower == e->upper});
      fill_distances(items.data(), items.data() + items.size(), rows + row * D, norms[row], rows, norms, D, metric);
      A top = A(0);
      for (const auto& item : items) top = std::max(top, item.distance);
      max_out[row] = top;
      out_counts[row] = kept;
      undecided[row] = emit_row(row, kept_values.data(), kept_indices.data(), k, m, N, top, normalize, out_values,
                                out_indices);
    }
  });

  // Rows left to the direct path: each computed whole.
  std::vector<int64_t> redo;
  for (int64_t row = 0; row < N; ++row)
    if (fallback[row]) redo.push_back(row);
  for_full_rows<A>(xs, redo, metric, [&](int64_t row, const A* raw) {
    std::vector<A> kept_values(m);
    std::vector<int64_t> kept_indices(m);
    SortedList<A> list{kept_values.data(), kept_indices.data(), 0, int(m)};
    for (int64_t c = 0; c < N; ++c) list.insert(raw[c], c);
    max_out[row] = range_max(raw, N);
    undecided[row] = emit_row(row, kept_values.data(), kept_indices.data(), k, m, N, max_out[row], normalize,
                              out_values, out_indices);
  });
  recompute_undecided(xs, rows_where(N, [&](int64_t r) { return undecided[r] != 0; }), k, metric, row_max, values,
                      indices);
}

// knn by the certified two-stage search; also every row's number of stage-2 candidates (-1: the
// row fell back to the direct path). The whole call runs the direct path when the rows are too
// long (D > 133,000) or too large (norm > 2^60) for the bound, when k is a large share of N, or
// when a probe of the rows says stage 1 would not pay (certified_pays).
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_certified_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                                                 c10::string_view metric_name) {
  check_knn_args(x, y, k);
  const KnnCall call(x, y, metric_name);
  const int64_t M = x.size(0);
  at::Tensor values, indices;
  std::tie(values, indices) = call.lists(M, k);
  at::Tensor counts = at::full({M}, -1, x.options().dtype(at::kLong));
  if (M == 0) return {values, indices, counts};
  AT_DISPATCH_FLOATING_TYPES(call.type, "knn_certified", [&] {
    std::optional<Stage1Rows<scalar_t>> xq, yq;
    if (!prefers_row_sort(k, y.size(0)) && fits_log(y.size(0)))
      xq = Stage1Rows<scalar_t>::make(call.xs), yq = Stage1Rows<scalar_t>::make(call.ys);
    if (xq && yq &&
        certified_pays(*xq, call.xs.norms.const_data_ptr<scalar_t>(), *yq, call.ys.norms.const_data_ptr<scalar_t>(),
                       call.metric, k, certified_cap(k, y.size(0))))
      knn_certified_impl<scalar_t>(call.xs, call.ys, *xq, *yq, k, call.metric, values, indices, counts);
    else knn_direct<scalar_t>(call.xs, call.ys, k, call.metric, values, indices);
  });
  return {values, indices, counts};
}

// self_knn by the certified two-stage search; also every row's number of stage-2 candidates (-1:
// the row fell back to the direct path). Runs the direct path when the bound does not apply or
// stage 1 would not pay (certified_pays).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_knn_certified_cpu(
    const at::Tensor& x, int64_t k, c10::string_view metric_name, bool normalize, int64_t cross_rows) {
  check_self_knn_args(x, k, cross_rows);
  SelfKnnCall call(x, k, metric_name, normalize, cross_rows);
  at::Tensor counts = at::full({x.size(0)}, -1, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(call.type, "self_knn_certified", [&] {
    const auto xq = fits_log(x.size(0)) ? Stage1Rows<scalar_t>::make(call.xs) : std::nullopt;
    const scalar_t* norms = call.xs.norms.const_data_ptr<scalar_t>();
    if (xq && certified_pays(*xq, norms, *xq, norms, call.metric, call.m, certified_cap(call.m, x.size(0))))
      self_knn_certified_impl<scalar_t>(call.xs, *xq, k, call.m, call.metric, normalize, cross_rows, call.values,
                                        call.indices, call.row_max, call.cross, counts);
    else
      self_knn_direct<scalar_t>(call.xs, k, call.m, call.metric, normalize, cross_rows, call.values, call.indices,
                                call.row_max, call.cross);
  });
  return {call.values, call.indices, call.row_max, call.cross, counts};
}

}  // namespace

// Stage 1's bounds for every pair (M, N), lower and upper, as the certified search computes them;
// the tests check them against float64 truth. Inputs the bound does not cover (Stage1Rows::make)
// are a ValueError here.
std::tuple<at::Tensor, at::Tensor> knn_certified_bounds_cpu(const at::Tensor& x, const at::Tensor& y,
                                                            c10::string_view metric_name) {
  check_knn_args(x, y, 1);
  const NoAutocastGuard no_autocast;
  const Metric metric = parse_metric(metric_name);
  const at::ScalarType type = compute_type(x.scalar_type(), y.scalar_type());
  const Operand xs(x, metric, type), ys(y, metric, type);
  const int64_t M = x.size(0), N = y.size(0);
  at::Tensor lower = at::empty({M, N}, x.options().dtype(type)), upper = at::empty_like(lower);
  AT_DISPATCH_FLOATING_TYPES(type, "knn_certified_bounds", [&] {
    const auto xq = Stage1Rows<scalar_t>::make(xs), yq = Stage1Rows<scalar_t>::make(ys);
    TORCH_CHECK_VALUE(xq && yq,
                      "knn_certified_bounds: rows too large (norm > 2^60) or too long (D > 133000) for the bound, "
                      "or no exact int8 GEMM in this process (dpm_ops.ops.int8_gemm_engine() is None)");
    Stage1Scratch<scalar_t> s(M, N);
    const int32_t* dots = s.gemm(*xq, 0, M, *yq, 0, N);
    const scalar_t none = std::numeric_limits<scalar_t>::infinity();
    for (int64_t r = 0; r < M; ++r) {
      stage1_line<false>(s.line(dots + r * N, N, metric, *xq, r, xs.norms.const_data_ptr<scalar_t>()[r], *yq, 0,
                                ys.norms.const_data_ptr<scalar_t>(), none, none));
      std::copy(s.lower.begin(), s.lower.end(), lower.data_ptr<scalar_t>() + r * N);
      std::copy(s.upper.begin(), s.upper.end(), upper.data_ptr<scalar_t>() + r * N);
    }
  });
  return {lower, upper};
}

DPM_OPS_KERNELS(CPU,
                "knn_certified", &knn_certified_cpu,
                "self_knn_certified", &self_knn_certified_cpu,
                "knn_certified_bounds", &knn_certified_bounds_cpu)

}  // namespace dpm_ops::knn
