// CPU kernels of the certified two-stage distance + top-k (knn_certified / self_knn_certified): the
// direct path's tilings (knn_cpu.h) with a bf16 GEMM and per-pair error bounds picking each row's
// candidates, recomputed in the compute type (derivation: docs/certified_knn.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "knn_cpu.h"
#include "../common/register_kernels.h"

namespace dpm_ops::knn {
namespace {

// ---------------------------------------------------------------------------------------------
// Certified two-stage search (derivation: docs/certified_knn.md).
//
// Stage 1 takes every pair's dot product s from a bf16 GEMM of the rows rounded to bf16 (fp32
// accumulation, bf16 output on the CPU). The direct path's dot product p (compute type, any
// summation order) then satisfies |s - p| <= E = c_D a_i a_j with
//   c_D = u (1 + g)(1 + v)^2   bf16 rounding of the GEMM's output
//       + g (1 + v)^2          fp32 accumulation of the bf16 products (exact in fp32)
//       + 2 v + v^2            rounding of the operands (v = 2^-8 + 2^-23: fp64 -> fp32 -> bf16)
//       + g                    the direct path's own accumulation error
//   u = 2^-8, g = gamma_D = D 2^-24 / (1 - D 2^-24), a_i = |x_i| (1 + g)(1 + 2^-10) + 2^-50:
// the computed norm's error, the fp32 rounding of E and of s +- E (each below 2^-22 |x_i||x_j|,
// against the 2^-17 |x_i||x_j| that the factor 2^-10 adds), and underflow's absolute terms (below
// D 2^-125 (1 + |x_i| + |x_j|), covered by 2^-50 for D < 2^20). Every metric's distance is
// monotone non-increasing in the dot product (pair_distance: round(S - 2p) with S fixed, 1 - p, the
// clamp at 0 and the square root, each monotone, as is their rounding), so
//   L = pair_distance(s + E) <= d(i, j) <= U = pair_distance(s - E)
// for the distance d(i, j) that the direct path computes. Per row, every item whose L is <= the
// k-th smallest U is kept (nothing else can be in the first k by (d, index): k items lie at or
// below that U < L); stage 2 recomputes the kept items' distances with the direct path's formula
// in the compute type and selects in (d, index) order. Rows keeping more than `cap` items fall
// back to the direct computation.

constexpr int64_t kCertifiedMinCap = 256;  // candidates per row before the row falls back
constexpr int64_t kCertifiedCapPerK = 8;

struct Stage1Bound {
  double constant = 0;   // c_D
  double norm_factor = 0;  // (1 + g)(1 + 2^-10)
  bool usable = false;   // D < 2^20
  explicit Stage1Bound(int64_t D) {
    if (D >= (int64_t(1) << 20)) return;
    const double g = D * std::ldexp(1.0, -24) / (1 - D * std::ldexp(1.0, -24));
    const double u = std::ldexp(1.0, -8), v = u + std::ldexp(1.0, -23), o = (1 + v) * (1 + v);
    constant = u * (1 + g) * o + g * o + 2 * v + v * v + g;
    norm_factor = (1 + g) * (1 + std::ldexp(1.0, -10));
    usable = true;
  }
};

constexpr double kMaxCertifiedNorm = 1.152921504606846976e18;  // 2^60: bf16 / fp32 products stay finite

// a_i for every row (sqrt(c_D) folded in, so E = a_i a_j), or an undefined tensor when some row's
// norm is too large (or not finite) for the stage-1 GEMM: the caller then runs the direct path.
at::Tensor stage1_scales(const Operand& xs, const Stage1Bound& bound) {
  if (!bound.usable) return {};
  at::Tensor norms = xs.norms.to(at::kDouble).sqrt();
  if (norms.numel() > 0 && !(norms.max().item<double>() <= kMaxCertifiedNorm)) return {};
  return (norms * bound.norm_factor + std::ldexp(1.0, -50)).mul_(std::sqrt(bound.constant)).to(at::kFloat);
}

template <typename A> struct Candidate {
  A lower, upper;
  int64_t index;
};

// Stage 1's per-row state for `rows` rows: the m smallest upper bounds (upper.limit: the m-th), the
// items whose lower bound was <= that limit when offered (near), and for the row maximum, the
// largest lower bound and the items whose upper bound was >= it (far). A row whose near or far
// list stays above `cap` after pruning is marked and left to the direct path.
template <typename A> struct CertifiedLists {
  ThreadLists<A> upper;
  std::vector<std::vector<Candidate<A>>> near, far;
  std::vector<char> overflow;
  int64_t cap;
  bool track_max;
  CertifiedLists(int64_t rows, int64_t m, int64_t cap, bool track_max)
      : upper(rows, m), near(rows), far(track_max ? rows : 0), overflow(rows, 0), cap(cap), track_max(track_max) {}

  A& max_lower(int64_t row) { return upper.row_max[row]; }
  bool wants(int64_t row, A lower, A up) { return lower <= upper.limit[row] || (track_max && up >= max_lower(row)); }

  // One tile line's bounds [first, end) offered to `row` (items offset + c), as offer_line does for
  // the direct path: blocks of kProbe values are tested branch-free against the row's limits first.
  void offer_to_row(int64_t row, const A* lo, const A* up, int64_t first, int64_t end, int64_t offset) {
    const A no_max = std::numeric_limits<A>::infinity();
    for (int64_t b = first; b < end; b += kProbe) {
      const int64_t stop = std::min(end, b + kProbe);
      const A limit = upper.limit[row], top = track_max ? max_lower(row) : no_max;
      bool any = false;
      for (int64_t c = b; c < stop; ++c) any |= (lo[c] <= limit) | (up[c] >= top);
      if (!any) continue;
      for (int64_t c = b; c < stop; ++c)
        if (wants(row, lo[c], up[c])) offer(row, lo[c], up[c], offset + c);
    }
  }

  // The same line offered transposed: column c to row offset + c, as item `index`.
  void offer_to_columns(int64_t index, const A* lo, const A* up, int64_t first, int64_t end, int64_t offset) {
    const A* limit = upper.limit.data() + offset;
    const A* top = upper.row_max.data() + offset;
    for (int64_t b = first; b < end; b += kProbe) {
      const int64_t stop = std::min(end, b + kProbe);
      bool any = false;
      for (int64_t c = b; c < stop; ++c) any |= (lo[c] <= limit[c]) | (up[c] >= top[c]);
      if (!any) continue;
      for (int64_t c = b; c < stop; ++c)
        if (wants(offset + c, lo[c], up[c])) offer(offset + c, lo[c], up[c], index);
    }
  }

  // After an overflow only the upper bounds are still collected (their limit is what a rescan of
  // the row needs).
  void offer(int64_t row, A lower, A up, int64_t index) {
    if (up <= upper.limit[row]) upper.offer(row, up, index);
    if (overflow[row]) return;
    if (lower <= upper.limit[row]) keep(row, near[row], {lower, up, index}, false);
    if (track_max) {
      if (lower > max_lower(row)) max_lower(row) = lower;
      if (up >= max_lower(row)) keep(row, far[row], {lower, up, index}, true);
    }
  }

 private:
  void keep(int64_t row, std::vector<Candidate<A>>& list, Candidate<A> c, bool for_max) {
    if (overflow[row]) return;
    list.push_back(c);
    if (int64_t(list.size()) <= 2 * cap) return;
    const A limit = for_max ? max_lower(row) : upper.limit[row];
    list.erase(std::remove_if(list.begin(), list.end(),
                              [&](const Candidate<A>& e) { return for_max ? e.upper < limit : e.lower > limit; }),
               list.end());
    if (int64_t(list.size()) > cap) {
      overflow[row] = 1;
      near[row] = {};
      if (track_max) far[row] = {};
    }
  }
};

// The direct path's dot product of two rows in the compute type (lanes of partial sums; symmetric
// in its arguments bit for bit).
template <typename A> A row_dot(const A* a, const A* b, int64_t D) {
  constexpr int kLanes = 8;
  A lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[d + l] * b[d + l];
  A sum = A(0);
  for (; d < D; ++d) sum += a[d] * b[d];
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// One line of a stage-1 tile: bf16 dot products -> lower and upper distance bounds, computed line by
// line into buffers that stay in L1 (no tile-sized pass through memory); the metric a template
// argument so the loop vectorises.
template <Metric kMetric, typename A>
void line_bounds_for(const at::BFloat16* s, int64_t cols, float row_scale, const float* col_scales, A row_norm,
                     const A* col_norms, A* lower, A* upper) {
  for (int64_t c = 0; c < cols; ++c) {
    const A dot = A(static_cast<float>(s[c])), e = A(row_scale * col_scales[c]);
    lower[c] = pair_distance(dot + e, row_norm, col_norms[c], kMetric);
    upper[c] = pair_distance(dot - e, row_norm, col_norms[c], kMetric);
  }
}

template <typename A>
void line_bounds(const at::BFloat16* s, int64_t cols, float row_scale, const float* col_scales, A row_norm,
                 const A* col_norms, Metric metric, A* lower, A* upper) {
  switch (metric) {
    case Metric::kCosine:
      return line_bounds_for<Metric::kCosine>(s, cols, row_scale, col_scales, row_norm, col_norms, lower, upper);
    case Metric::kSqEuclidean:
      return line_bounds_for<Metric::kSqEuclidean>(s, cols, row_scale, col_scales, row_norm, col_norms, lower, upper);
    case Metric::kEuclidean:
      return line_bounds_for<Metric::kEuclidean>(s, cols, row_scale, col_scales, row_norm, col_norms, lower, upper);
  }
}

int64_t certified_cap(int64_t k, int64_t N) { return std::min(N, std::max(kCertifiedMinCap, kCertifiedCapPerK * k)); }

// One stage-1 + stage-2 pass over the rows of xs. `limits` holds each row's starting threshold
// (+inf, or a rescan's known final one) and gets the final one (the k-th smallest upper bound).
// counts: the row's candidates; -2 where the near list overflowed while the threshold was still
// falling (a rescan from the final threshold may keep fewer), -1 where the final set is over the cap.
template <typename A>
void knn_certified_pass(const Operand& xs, const Operand& ys, const at::Tensor& x_scales, const at::Tensor& y_scales,
                        int64_t k, Metric metric, std::vector<A>& limits, at::Tensor& values, at::Tensor& indices,
                        at::Tensor& counts) {
  const int64_t M = xs.rows.size(0), Ny = ys.rows.size(0), D = xs.rows.size(1);
  const int64_t cap = certified_cap(k, Ny);
  const at::Tensor xb = xs.rows.to(at::kFloat).to(at::kBFloat16), yb = ys.rows.to(at::kFloat).to(at::kBFloat16);
  const A* x_norms = xs.norms.const_data_ptr<A>();
  const A* y_norms = ys.norms.const_data_ptr<A>();
  const A* x_rows = xs.rows.const_data_ptr<A>();
  const A* y_rows = ys.rows.const_data_ptr<A>();
  const float* xa = x_scales.const_data_ptr<float>();
  const float* ya = y_scales.const_data_ptr<float>();
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  int64_t* out_counts = counts.data_ptr<int64_t>();
  struct Scratch {
    std::vector<A> lower, upper;  // one tile line's bounds
  };
  const auto make_scratch = [&](int) {
    return Scratch{std::vector<A>(std::min(kColumnBlock, Ny)), std::vector<A>(std::min(kColumnBlock, Ny))};
  };
  parallel_tasks((M + kRowBlock - 1) / kRowBlock, omp_get_max_threads(), make_scratch, [&](Scratch& s, int64_t block) {
    const int64_t r0 = block * kRowBlock, nr = std::min(kRowBlock, M - r0);
    CertifiedLists<A> lists(nr, k, cap, false);
    std::copy(limits.begin() + r0, limits.begin() + r0 + nr, lists.upper.limit.begin());
    for (int64_t c0 = 0; c0 < Ny; c0 += kColumnBlock) {
      const int64_t nc = std::min(kColumnBlock, Ny - c0);
      const at::Tensor tile = at::mm(xb.narrow(0, r0, nr), yb.narrow(0, c0, nc).t()).contiguous();
      const at::BFloat16* dots = tile.const_data_ptr<at::BFloat16>();
      for (int64_t r = 0; r < nr; ++r) {
        line_bounds(dots + r * nc, nc, xa[r0 + r], ya + c0, x_norms[r0 + r], y_norms + c0, metric, s.lower.data(),
                    s.upper.data());
        lists.offer_to_row(r, s.lower.data(), s.upper.data(), 0, nc, c0);
      }
    }
    // Stage 2: the kept items' distances as the direct path computes them, in (value, index) order.
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = r0 + r;
      const A limit = lists.upper.limit[r];
      limits[row] = limit;
      out_counts[row] = -2;
      if (lists.overflow[r]) continue;
      int64_t kept = 0;
      for (const auto& c : lists.near[r]) kept += c.lower <= limit;
      out_counts[row] = -1;
      if (kept > cap) continue;
      SortedList<A> list{out_values + row * k, out_indices + row * k, 0, int(k)};
      for (const auto& c : lists.near[r]) {
        if (c.lower > limit) continue;
        const A d = c.lower == c.upper ? c.lower
                                       : pair_distance(row_dot(x_rows + row * D, y_rows + c.index * D, D),
                                                       x_norms[row], y_norms[c.index], metric);
        list.insert(d, c.index);
      }
      out_counts[row] = kept;
    }
  });
}

template <typename A>
void knn_certified_impl(const Operand& xs, const Operand& ys, const at::Tensor& x_scales, const at::Tensor& y_scales,
                        int64_t k, Metric metric, at::Tensor& values, at::Tensor& indices, at::Tensor& counts) {
  const int64_t M = xs.rows.size(0);
  std::vector<A> limits(M, std::numeric_limits<A>::infinity());
  knn_certified_pass<A>(xs, ys, x_scales, y_scales, k, metric, limits, values, indices, counts);
  // Rows whose near list overflowed while their threshold was still falling: once more from the
  // final threshold (items that arrive early are then not kept for nothing).
  const int64_t* count = counts.const_data_ptr<int64_t>();  // updated in place below
  const at::Tensor rescan = rows_where(M, [&](int64_t r) { return count[r] == -2; });
  if (rescan.numel() > 0) {
    std::vector<A> rescan_limits;
    for (int64_t p = 0; p < rescan.size(0); ++p) rescan_limits.push_back(limits[rescan.const_data_ptr<int64_t>()[p]]);
    at::Tensor part_values = at::empty({rescan.size(0), k}, values.options());
    at::Tensor part_indices = at::empty({rescan.size(0), k}, indices.options());
    at::Tensor part_counts = at::empty({rescan.size(0)}, counts.options());
    knn_certified_pass<A>(xs.take(rescan), ys, x_scales.index_select(0, rescan), y_scales, k, metric, rescan_limits,
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
void self_knn_certified_impl(const Operand& xs, const at::Tensor& scales, int64_t k, int64_t m, Metric metric,
                             bool normalize, int64_t cross_rows, at::Tensor& values, at::Tensor& indices,
                             at::Tensor& row_max, at::Tensor& cross, at::Tensor& counts) {
  const int64_t N = xs.rows.size(0), D = xs.rows.size(1);
  const int64_t cap = certified_cap(m, N);
  const at::Tensor xb = xs.rows.to(at::kFloat).to(at::kBFloat16);
  const A* norms = xs.norms.const_data_ptr<A>();
  const A* rows = xs.rows.const_data_ptr<A>();
  const float* scale = scales.const_data_ptr<float>();
  A* cross_out = cross.data_ptr<A>();
  const int64_t cross_cols = N - cross_rows;
  // Tile edges every kSelfTile and at cross_rows: a tile of query rows and gallery columns lies in
  // the cross block, which is needed in the compute type anyway; its GEMM gives exact values
  // (lower = upper) and the bf16 GEMM covers the rest.
  std::vector<int64_t> edges;
  for (int64_t e = 0; e < N; e += kSelfTile) edges.push_back(e);
  if (cross_rows > 0 && cross_rows < N) edges.push_back(cross_rows);
  std::sort(edges.begin(), edges.end());
  edges.erase(std::unique(edges.begin(), edges.end()), edges.end());
  edges.push_back(N);
  const int64_t num_edges = int64_t(edges.size()) - 1;
  const std::vector<std::pair<int64_t, int64_t>> tiles = upper_tiles(num_edges);
  const int num_threads = omp_get_max_threads();
  std::vector<CertifiedLists<A>> state;
  state.reserve(num_threads);
  for (int t = 0; t < num_threads; ++t) state.emplace_back(N, m, cap, true);

  struct Scratch {
    CertifiedLists<A>* own;       // the thread's lists
    std::vector<A> lower, upper;  // one tile line's bounds
    at::Tensor buffer;            // a cross tile's GEMM
  };
  const auto make_scratch = [&](int thread) {
    const int64_t side = std::min(kSelfTile, N);
    return Scratch{&state[thread], std::vector<A>(side), std::vector<A>(side),
                   at::empty({side * side}, xs.rows.options())};
  };
  parallel_tasks(int64_t(tiles.size()), num_threads, make_scratch, [&](Scratch& s, int64_t t) {
    CertifiedLists<A>& own = *s.own;
    const int64_t r0 = edges[tiles[t].first], nr = edges[tiles[t].first + 1] - r0;
    const int64_t c0 = edges[tiles[t].second], nc = edges[tiles[t].second + 1] - c0;
    const bool diagonal = r0 == c0, in_cross = r0 < cross_rows && c0 >= cross_rows;
    at::Tensor bf16_tile;
    const A* exact = nullptr;  // the cross block's distances (lower = upper), else bounds from bf16_tile
    if (in_cross) {
      at::Tensor tile = tile_view(s.buffer, nr, nc);
      at::mm_out(tile, xs.rows.narrow(0, r0, nr), xs.rows.narrow(0, c0, nc).t());
      A* dots = tile.data_ptr<A>();
      finish_tile(dots, nr, nc, norms + r0, norms + c0, metric);
      for (int64_t r = 0; r < nr; ++r)
        std::copy(dots + r * nc, dots + (r + 1) * nc, cross_out + (r0 + r) * cross_cols + (c0 - cross_rows));
      exact = dots;
    } else {
      bf16_tile = at::mm(xb.narrow(0, r0, nr), xb.narrow(0, c0, nc).t()).contiguous();
    }
    // In a diagonal tile only c > r is used, offered both ways; d(i, i) is 0.
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t row = r0 + r;
      if (diagonal) own.offer(row, A(0), A(0), row);
      const int64_t first = diagonal ? r + 1 : 0;
      const A* lo = exact ? exact + r * nc : s.lower.data();
      const A* up = exact ? exact + r * nc : s.upper.data();
      if (!exact)
        line_bounds(bf16_tile.const_data_ptr<at::BFloat16>() + r * nc, nc, scale[row], scale + c0, norms[row],
                    norms + c0, metric, s.lower.data(), s.upper.data());
      own.offer_to_row(row, lo, up, first, nc, c0);
      own.offer_to_columns(row, lo, up, first, nc, c0);
    }
  });

  // Merge the threads' stage-1 lists, then stage 2 per row: the kept items' distances as the direct
  // path computes them, the m smallest in (value, index) order, and the row maximum.
  A* out_values = values.data_ptr<A>();
  int64_t* out_indices = indices.data_ptr<int64_t>();
  A* max_out = row_max.data_ptr<A>();
  int64_t* out_counts = counts.data_ptr<int64_t>();
  std::vector<char> undecided(N, 0), fallback(N, 0);
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<A> merged_values(m), kept_values(m);
    std::vector<int64_t> merged_indices(m), kept_indices(m);
    for (int64_t row = begin; row < end; ++row) {
      SortedList<A> merged{merged_values.data(), merged_indices.data(), 0, int(m)};
      A max_lower = A(0);
      bool overflow = false;
      for (auto& s : state) {
        overflow |= s.overflow[row] != 0;
        max_lower = std::max(max_lower, s.max_lower(row));
        for (int p = 0; p < s.upper.count[row]; ++p)
          merged.insert(s.upper.values[row * m + p], s.upper.indices[row * m + p]);
      }
      const A limit = merged_values[m - 1];
      int64_t kept = 0;
      if (!overflow)
        for (const auto& s : state)
          for (const auto& c : s.near[row]) kept += c.lower <= limit;
      if (overflow || kept > cap) {
        fallback[row] = 1;
        out_counts[row] = -1;
        continue;
      }
      const auto distance = [&](const Candidate<A>& c) {
        if (c.lower == c.upper) return c.lower;
        return pair_distance(row_dot(rows + row * D, rows + c.index * D, D), norms[row], norms[c.index], metric);
      };
      SortedList<A> list{kept_values.data(), kept_indices.data(), 0, int(m)};
      A top = A(0);
      for (const auto& s : state) {
        for (const auto& c : s.near[row])
          if (c.lower <= limit) list.insert(distance(c), c.index);
        for (const auto& c : s.far[row])
          if (c.upper >= max_lower) top = std::max(top, distance(c));
      }
      max_out[row] = top;
      out_counts[row] = kept;
      undecided[row] = emit_row(row, kept_values.data(), kept_indices.data(), k, m, N, top, normalize, out_values,
                                out_indices);
    }
  });
  state.clear();

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
// long (D >= 2^20) or too large (norm > 2^60) for the bound, or when k is a large share of N.
std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_certified_cpu(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                                                 c10::string_view metric_name) {
  check_knn_args(x, y, k);
  const KnnCall call(x, y, metric_name);
  const int64_t M = x.size(0);
  at::Tensor values, indices;
  std::tie(values, indices) = call.lists(M, k);
  at::Tensor counts = at::full({M}, -1, x.options().dtype(at::kLong));
  if (M == 0) return {values, indices, counts};
  const Stage1Bound bound(x.size(1));
  const at::Tensor x_scales = stage1_scales(call.xs, bound), y_scales = stage1_scales(call.ys, bound);
  const bool certified = x_scales.defined() && y_scales.defined() && !prefers_row_sort(k, y.size(0));
  AT_DISPATCH_FLOATING_TYPES(call.type, "knn_certified", [&] {
    if (certified)
      knn_certified_impl<scalar_t>(call.xs, call.ys, x_scales, y_scales, k, call.metric, values, indices, counts);
    else knn_direct<scalar_t>(call.xs, call.ys, k, call.metric, values, indices);
  });
  return {values, indices, counts};
}

// self_knn by the certified two-stage search; also every row's number of stage-2 candidates (-1:
// the row fell back to the direct path). Runs the direct path when the bound does not apply.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_knn_certified_cpu(
    const at::Tensor& x, int64_t k, c10::string_view metric_name, bool normalize, int64_t cross_rows) {
  check_self_knn_args(x, k, cross_rows);
  SelfKnnCall call(x, k, metric_name, normalize, cross_rows);
  at::Tensor counts = at::full({x.size(0)}, -1, x.options().dtype(at::kLong));
  const at::Tensor scales = stage1_scales(call.xs, Stage1Bound(x.size(1)));
  AT_DISPATCH_FLOATING_TYPES(call.type, "self_knn_certified", [&] {
    if (scales.defined())
      self_knn_certified_impl<scalar_t>(call.xs, scales, k, call.m, call.metric, normalize, cross_rows, call.values,
                                        call.indices, call.row_max, call.cross, counts);
    else
      self_knn_direct<scalar_t>(call.xs, k, call.m, call.metric, normalize, cross_rows, call.values, call.indices,
                                call.row_max, call.cross);
  });
  return {call.values, call.indices, call.row_max, call.cross, counts};
}

}  // namespace

// Stage 1's bounds for every pair (M, N), lower and upper, as the certified search computes them;
// the tests check them against float64 truth. Undefined-bound inputs (see stage1_scales) are a
// ValueError here.
std::tuple<at::Tensor, at::Tensor> knn_certified_bounds_cpu(const at::Tensor& x, const at::Tensor& y,
                                                            c10::string_view metric_name) {
  check_knn_args(x, y, 1);
  const NoAutocastGuard no_autocast;
  const Metric metric = parse_metric(metric_name);
  const at::ScalarType type = compute_type(x.scalar_type(), y.scalar_type());
  const Operand xs(x, metric, type), ys(y, metric, type);
  const Stage1Bound bound(x.size(1));
  const at::Tensor x_scales = stage1_scales(xs, bound), y_scales = stage1_scales(ys, bound);
  TORCH_CHECK_VALUE(x_scales.defined() && y_scales.defined(),
                    "knn_certified_bounds: rows too large (norm > 2^60) or too long (D >= 2^20) for the bound");
  at::Tensor lower = at::empty({x.size(0), y.size(0)}, x.options().dtype(type)), upper = at::empty_like(lower);
  const at::Tensor dots =
      at::mm(xs.rows.to(at::kFloat).to(at::kBFloat16), ys.rows.to(at::kFloat).to(at::kBFloat16).t()).contiguous();
  const int64_t N = y.size(0);
  AT_DISPATCH_FLOATING_TYPES(type, "knn_certified_bounds", [&] {
    for (int64_t r = 0; r < x.size(0); ++r)
      line_bounds(dots.const_data_ptr<at::BFloat16>() + r * N, N, x_scales.const_data_ptr<float>()[r],
                  y_scales.const_data_ptr<float>(), xs.norms.const_data_ptr<scalar_t>()[r],
                  ys.norms.const_data_ptr<scalar_t>(), metric, lower.data_ptr<scalar_t>() + r * N,
                  upper.data_ptr<scalar_t>() + r * N);
  });
  return {lower, upper};
}

DPM_OPS_KERNELS(CPU,
                "knn_certified", &knn_certified_cpu,
                "self_knn_certified", &self_knn_certified_cpu,
                "knn_certified_bounds", &knn_certified_bounds_cpu)

}  // namespace dpm_ops::knn
