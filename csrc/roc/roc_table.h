// The ROC counts op on any device (the schema's arguments): its first pass, the distinct match distances
// with their counts (found through the pid groups, no pass over the pairs) and the monotone bins' table,
// built with ATen on the host side, then Kernels::count, the pass over the pairs (csrc/roc/roc_{cpu,cuda}.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../rank/rank_groups.h"
#include "roc_math.h"

namespace dpm_ops::roc {

// About two bins per match distance (most then hold none or one: no search), 2^10 to 2^20.
inline int64_t bin_count(int64_t num_values) {
  int bits = 1;
  for (int64_t v = num_values; v > 1; v = (v + 1) / 2) ++bits;
  return int64_t(1) << std::clamp(bits, 10, 20);
}

// (distinct match distances ascending, the matches at each): the kept pairs with the query's pid.
inline std::tuple<at::Tensor, at::Tensor> match_distances(const rank::MatchInputs& in) {
  const rank::PidGroups groups(in.q_pids, in.g_pids);
  const at::Tensor query = at::repeat_interleave(groups.length);  // each group member's query
  const at::Tensor offset = groups.start - (groups.length.cumsum(0) - groups.length);
  const at::Tensor item = groups.order.index_select(0, at::arange(query.size(0), query.options()) +
                                                           offset.index_select(0, query));
  const at::Tensor kept = in.g_cams.index_select(0, item).ne(in.q_cams.index_select(0, query));
  const at::Tensor pair = (query * in.dist.size(1) + item).masked_select(kept);
  const auto [values, inverse, matches] =
      at::_unique2(in.dist.view(-1).index_select(0, pair), /*sorted=*/true, /*return_inverse=*/false,
                   /*return_counts=*/true);
  return {values, matches};
}

// The bins of the distinct match distances `values` (on the CPU, finite, ascending): low their least,
// scale spreading them over the bins (any positive finite scale keeps the counts exact), and the table of
// Bin<A> (count + 1 of them) in a byte tensor.
template <typename A> struct BinTable {
  int64_t count;
  A low = A(0), scale = A(1);
  at::Tensor table;

  explicit BinTable(const at::Tensor& values) : count(bin_count(values.size(0))) {
    const A* v = values.const_data_ptr<A>();
    const int64_t num_values = values.size(0);
    if (num_values > 0) {
      low = v[0];
      const double span = double(v[num_values - 1]) - double(v[0]);  // may be inf for fp64
      if (span > 0) scale = A(std::min(double(count - 3) / span, 1e30));
      if (!(scale > A(0))) scale = std::numeric_limits<A>::min();
    }
    table = at::empty({int64_t((count + 1) * sizeof(Bin<A>))}, at::kByte);
    Bin<A>* bins = reinterpret_cast<Bin<A>*>(table.data_ptr<uint8_t>());
    std::fill(bins, bins + count + 1, Bin<A>{0, std::numeric_limits<A>::infinity()});
    const MonotoneBins<A> map{v, bins, count, low, scale};
    for (int64_t i = 0; i < num_values; ++i) {
      const int64_t b = bin_of(v[i], map);
      bins[b].only = bins[b].only == std::numeric_limits<A>::infinity() ? v[i] : std::numeric_limits<A>::quiet_NaN();
      ++bins[b + 1].first;  // counted here, summed below
    }
    for (int64_t b = 0; b < count; ++b) bins[b + 1].first += bins[b].first;
  }
};

// (matches (U,), buckets (2U + 2,)): the matches at each distinct match distance (ascending); per
// non-match, one count in bucket 2i (i match distances below it, none equal) or 2i + 1 (equal to the
// i-th); buckets[2U + 1] is 1 when distmat holds a NaN or inf (the other counts are then unspecified).
// Kernels::count<A>(in, map, buckets) adds the non-matches' counts and sets that flag.
template <class Kernels>
std::tuple<at::Tensor, at::Tensor> roc_counts_op(const at::Tensor& dist, const at::Tensor& q_pids,
                                                 const at::Tensor& g_pids, const at::Tensor& q_cams,
                                                 const at::Tensor& g_cams) {
  const rank::MatchInputs in("roc_counts", dist, q_pids, g_pids, q_cams, g_cams);  // checks first: one device
  const c10::OptionalDeviceGuard guard(at::device_of(in.dist));
  at::Tensor values, matches;  // not structured bindings: C++17 lambdas cannot capture those
  std::tie(values, matches) = match_distances(in);
  const int64_t num_values = values.size(0);
  at::Tensor buckets = at::zeros({2 * num_values + 2}, in.q_pids.options());
  if (!at::isfinite(values).all().item<bool>()) {
    buckets[2 * num_values + 1] = 1;
    return {matches, buckets};
  }
  AT_DISPATCH_FLOATING_TYPES(in.dist.scalar_type(), "roc_counts", [&] {
    const BinTable<scalar_t> bins(values.cpu());
    const at::Tensor table = bins.table.to(in.dist.device());
    const MonotoneBins<scalar_t> map{values.const_data_ptr<scalar_t>(),
                                     reinterpret_cast<const Bin<scalar_t>*>(table.const_data_ptr<uint8_t>()),
                                     bins.count, bins.low, bins.scale};
    Kernels::template count<scalar_t>(in, map, buckets);
  });
  return {matches, buckets};
}

}  // namespace dpm_ops::roc
