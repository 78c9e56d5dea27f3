// Per-pair logic of the ROC counts (fast-reid's TPR@FPR report, dpm_ops/evaluation/roc.py), shared by
// the CPU and CUDA kernels: the bucket of a non-match distance among the U distinct match distances
// (ascending): 2i when i of them lie below it and none equals it, 2i + 1 when the i-th (0-based) equals it.
//
// The search starts from a monotone bin of the distance: bin(d) = trunc(clamp((d - low) * scale, -1,
// bins - 2) + 1), each operation IEEE-rounded and non-decreasing in d, so bin(d) is non-decreasing in
// d (no FMA can form: no product is added to). A match distance in a lower bin than d's is below d, one
// in a higher bin above it; only those in d's own bin are compared with d. A bin holds at most one of
// them in the common case, whose bucket then follows without a branch: 2 * (match distances in the lower
// bins) + (d >= its value) + (d > its value), with +inf standing for an empty bin's value; a bin with
// several is marked by a NaN value and searched.
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace dpm_ops::roc {

// NaN and inf give NaN, every finite value 0 (no fast-math in this library's builds).
template <typename A> DPM_HD bool is_finite(A v) { return v - v == A(0); }

template <typename A> struct Bin {
  int64_t first;  // the number of match distances in the lower bins
  A only;         // the bin's match distance: +inf when it holds none, NaN when it holds several
};

template <typename A> struct MonotoneBins {
  const A* values;     // the distinct match distances, ascending
  const Bin<A>* bins;  // (count + 1,): the last one's `first` is the number of match distances
  int64_t count;       // >= 3
  A low, scale;        // the least match distance; a positive, finite scale
};

template <typename A> DPM_HD int64_t bin_of(A d, const MonotoneBins<A>& map) {
  A s = (d - map.low) * map.scale;  // +inf for a huge finite d - low; clamped below
  const A top = A(map.count - 2);
  s = s >= A(-1) ? s : A(-1);  // NaN too: a bin for any d
  s = s <= top ? s : top;
  return int64_t(s + A(1));  // in [0, count - 1]
}

// The bucket of a finite non-match distance d (see the top of the file).
template <typename A> DPM_HD int64_t bucket_of(A d, const MonotoneBins<A>& map) {
  const Bin<A>& bin = map.bins[bin_of(d, map)];
  if (bin.only == bin.only) return 2 * bin.first + (d >= bin.only) + (d > bin.only);
  int64_t lo = bin.first;
  const int64_t end = (&bin)[1].first;
  int64_t hi = end;
  while (lo < hi) {  // the first match distance >= d in the bin, or end
    const int64_t mid = (lo + hi) / 2;
    if (map.values[mid] < d) lo = mid + 1;
    else hi = mid;
  }
  return 2 * lo + (lo < end && map.values[lo] == d);
}

}  // namespace dpm_ops::roc
