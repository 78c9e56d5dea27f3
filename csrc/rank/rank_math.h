// Per-query logic of the sort-free Market-1501 evaluator, shared by the CPU and CUDA kernels.
//
// Protocol (dpm_ops/evaluation/rank.py): gallery items with the query's pid and camera are
// removed; the remaining items with its pid are its matches; the gallery is ordered by
// (distance, index). A match's rank = 1 + #{kept g : (d_g, g) < (d_match, match)}, so one pass
// over the gallery gives every rank: each kept item adds one to the ranks of the matches after it.
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace dpm_ops::rank {

DPM_HD bool is_kept(int64_t g_pid, int64_t g_cam, int64_t q_pid, int64_t q_cam) {
  return !(g_pid == q_pid && g_cam == q_cam);
}

template <typename A> DPM_HD bool pair_less(A a, int64_t ia, A b, int64_t ib) {
  return a < b || (a == b && ia < ib);
}

// The query's pid group: `members` lists the gallery items with its pid (any camera), ascending.
DPM_HD int64_t count_matches(const int64_t* members, int64_t num_members, const int64_t* g_cams, int64_t q_cam) {
  int64_t n = 0;
  for (int64_t p = 0; p < num_members; ++p) n += g_cams[members[p]] != q_cam;
  return n;
}

// Heap sort of (value, index) pairs by (value, index): in place, no recursion, O(n log n).
template <typename A> DPM_HD void sift_down(A* v, int64_t* idx, int64_t root, int64_t n) {
  while (true) {
    int64_t child = 2 * root + 1;
    if (child >= n) return;
    if (child + 1 < n && pair_less(v[child], idx[child], v[child + 1], idx[child + 1])) ++child;
    if (!pair_less(v[root], idx[root], v[child], idx[child])) return;
    const A tv = v[root];
    v[root] = v[child];
    v[child] = tv;
    const int64_t ti = idx[root];
    idx[root] = idx[child];
    idx[child] = ti;
    root = child;
  }
}

template <typename A> DPM_HD void sort_pairs(A* v, int64_t* idx, int64_t n) {
  for (int64_t r = n / 2 - 1; r >= 0; --r) sift_down(v, idx, r, n);
  for (int64_t end = n - 1; end > 0; --end) {
    const A tv = v[0];
    v[0] = v[end];
    v[end] = tv;
    const int64_t ti = idx[0];
    idx[0] = idx[end];
    idx[end] = ti;
    sift_down(v, idx, 0, end);
  }
}

// Ranks (ascending) of the query's `n` matches (count_matches) into ranks[0..n). Scratch:
// match_d, match_idx (n). The pass over the gallery compares distances first: only items no
// farther than the farthest match (a few percent) read their labels.
// The ranks are also the counts of kept items before each match, accumulated in `ranks` itself:
// a kept item preceding exactly the matches from position p on adds one at p (prefix sum after).
template <typename A>
DPM_HD void match_ranks(const A* row, const int64_t* g_pids, const int64_t* g_cams, int64_t G, int64_t q_pid,
                        int64_t q_cam, const int64_t* members, int64_t num_members, int64_t n, A* match_d,
                        int64_t* match_idx, int64_t* ranks) {
  if (n == 0) return;
  int64_t found = 0;
  for (int64_t p = 0; p < num_members; ++p) {
    const int64_t g = members[p];
    if (g_cams[g] != q_cam) {
      match_d[found] = row[g];
      match_idx[found++] = g;
    }
  }
  sort_pairs(match_d, match_idx, n);
  for (int64_t p = 0; p < n; ++p) ranks[p] = 0;
  const A farthest = match_d[n - 1];
  for (int64_t g = 0; g < G; ++g) {
    const A d = row[g];
    if (d > farthest || !is_kept(g_pids[g], g_cams[g], q_pid, q_cam)) continue;
    // p = number of matches at or before (d, g); g precedes the matches from p on.
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (pair_less(d, g, match_d[mid], match_idx[mid])) hi = mid;
      else lo = mid + 1;
    }
    if (lo < n) ++ranks[lo];
  }
  int64_t running = 1;
  for (int64_t p = 0; p < n; ++p) {
    running += ranks[p];
    ranks[p] = running;
  }
}

}  // namespace dpm_ops::rank
