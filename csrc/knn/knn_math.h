// Per-element and per-row logic of the fused distance + top-k (k-nearest-neighbour) op, shared by
// the CPU and CUDA kernels.
//
// Order: candidates are compared as (value, index) pairs, so a row's k smallest are unique and
// equal values keep the lower column index first, as a stable sort of the full row would give.
// Distances come from the GEMM form: raw = |x|^2 + |y|^2 - 2 x.y (clamped at 0) for the Euclidean
// metrics, raw = 1 - x^.y^ for cosine (rows pre-normalised).
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace dpm_ops::knn {

enum class Metric : int { kEuclidean = 0, kSqEuclidean = 1, kCosine = 2 };

// The metric's distance from the dot product of a pair and the rows' squared norms (for cosine
// the rows are unit vectors and the norms are unused).
template <typename A> DPM_HD A pair_distance(A dot, A x_norm, A y_norm, Metric metric) {
  if (metric == Metric::kCosine) return A(1) - dot;
  A raw = x_norm + y_norm - A(2) * dot;
  raw = raw > A(0) ? raw : A(0);
  return metric == Metric::kEuclidean ? square_root(raw) : raw;
}

// (a, ia) < (b, ib) in (value, index) order.
template <typename A> DPM_HD bool pair_less(A a, int64_t ia, A b, int64_t ib) {
  return a < b || (a == b && ia < ib);
}

// A row's `capacity` smallest (value, index) pairs seen so far, kept sorted ascending in two
// arrays; `count` entries are filled. Insertion shifts the larger entries up: cheap, because
// once the list is full almost every candidate fails the first comparison with the last entry.
template <typename A> struct SortedList {
  A* values;
  int64_t* indices;
  int count;
  int capacity;

  DPM_HD bool accepts(A v, int64_t i) const {
    return count < capacity || pair_less(v, i, values[capacity - 1], indices[capacity - 1]);
  }

  DPM_HD void insert(A v, int64_t i) {
    if (!accepts(v, i)) return;
    int p = count < capacity ? count++ : capacity - 1;
    while (p > 0 && pair_less(v, i, values[p - 1], indices[p - 1])) {
      values[p] = values[p - 1];
      indices[p] = indices[p - 1];
      --p;
    }
    values[p] = v;
    indices[p] = i;
  }

  // The largest value that can still enter (+inf-like sentinel when not full is the caller's).
  DPM_HD bool full() const { return count == capacity; }
  DPM_HD A last_value() const { return values[capacity - 1]; }
};

// After a full row scan of raw values, the order wanted is by (raw / scale, index) (division by
// the row maximum). Division can merge distinct raw values, so a list of the m > k smallest raw
// values decides the first k only if the k-th scaled value stays below the scaled value of the
// m-th raw one (everything left out has a raw value >= it). Returns false when the row must be
// resolved from its full set of values instead.
template <typename A> DPM_HD bool scaled_order_is_decided(A kth_scaled, A largest_kept_raw, A scale) {
  return kth_scaled < largest_kept_raw / scale;
}

}  // namespace dpm_ops::knn
