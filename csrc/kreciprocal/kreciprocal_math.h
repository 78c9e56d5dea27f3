// Per-row logic of k-reciprocal re-ranking on fixed-width neighbour lists (spec rerank_eval.md
// §1.3), shared by the CPU kernels and any device port: plain pointers, no allocation.
//
// neighbours: (N, width) row-major, each row's nearest items in (normalised distance, index)
// order, the item itself normally first. N(i, k) = the first k + 1 entries.
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace dpm_ops {
namespace kreciprocal {

// i in N(j, k)?
DPM_HD bool in_first(const int64_t* neighbours, int64_t width, int64_t j, int64_t count, int64_t i) {
  const int64_t* row = neighbours + j * width;
  for (int64_t p = 0; p < count; ++p)
    if (row[p] == i) return true;
  return false;
}

// R(i, k) = {j in N(i, k) : i in N(j, k)} in the order of N(i, k), with count = k + 1 (capped
// at width). Writes at most `count` items to out; returns how many.
DPM_HD int64_t reciprocal_set(const int64_t* neighbours, int64_t width, int64_t i, int64_t count, int64_t* out) {
  int64_t size = 0;
  const int64_t* row = neighbours + i * width;
  for (int64_t p = 0; p < count; ++p)
    if (in_first(neighbours, width, row[p], count, i)) out[size++] = row[p];
  return size;
}

DPM_HD bool contains(const int64_t* items, int64_t size, int64_t v) {
  for (int64_t p = 0; p < size; ++p)
    if (items[p] == v) return true;
  return false;
}

// R*(i): R(i, k1) united with every R(c, kh), c in R(i, k1), with 3 |R(c, kh) & R(i, k1)| >
// 2 |R(c, kh)|; unique and sorted ascending. half_sets / half_sizes: R(c, kh) of every item
// (row c at half_sets + c * count_h), computed once. `own` needs count1 slots, `out`
// count1 * (count_h + 1) (the most R* can hold). Returns |R*(i)|.
DPM_HD int64_t expanded_set(const int64_t* neighbours, int64_t width, int64_t i, int64_t count1, int64_t count_h,
                            const int64_t* half_sets, const int64_t* half_sizes, int64_t* own, int64_t* out) {
  const int64_t own_size = reciprocal_set(neighbours, width, i, count1, own);
  int64_t size = 0;
  for (int64_t p = 0; p < own_size; ++p) out[size++] = own[p];
  for (int64_t p = 0; p < own_size; ++p) {
    const int64_t* half = half_sets + own[p] * count_h;
    const int64_t half_size = half_sizes[own[p]];
    int64_t overlap = 0;
    for (int64_t q = 0; q < half_size; ++q) overlap += contains(own, own_size, half[q]);
    if (3 * overlap > 2 * half_size)
      for (int64_t q = 0; q < half_size; ++q)
        if (!contains(out, size, half[q])) out[size++] = half[q];
  }
  // Insertion sort: sets hold tens of items.
  for (int64_t p = 1; p < size; ++p) {
    const int64_t v = out[p];
    int64_t q = p;
    for (; q > 0 && out[q - 1] > v; --q) out[q] = out[q - 1];
    out[q] = v;
  }
  return size;
}

// Jaccard distance from the min-sum m of two rows that both sum to 1, blended with the
// normalised distance d, in the reference's float order: (1 - m / (2 - m)) * (1 - lambda) + d * lambda.
template <typename A> DPM_HD A jaccard_blend(A m, A d, A jaccard_weight, A keep) {
  return (A(1) - m / (A(2) - m)) * jaccard_weight + d * keep;
}

}  // namespace kreciprocal
}  // namespace dpm_ops
