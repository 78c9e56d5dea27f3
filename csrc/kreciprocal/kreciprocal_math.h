// Per-row logic of k-reciprocal re-ranking (Zhong et al., CVPR 2017, as its reference code computes it) on fixed-width
// neighbour lists, shared by the CPU kernels (kreciprocal_cpu.cpp) and the CUDA kernels (kreciprocal_kernels.cu): plain
// pointers and caller-owned scratch, no allocation.
//
// neighbours: (N, width) row-major, each row's nearest items in (normalised distance, index)
// order, the item itself normally first. N(i, k) = the first k + 1 entries.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/host_device.h"

namespace dpm_ops::kreciprocal {

// Products and sums rounded one operation at a time: nvcc would contract a * b + c into an fma,
// and the CUDA kernels must give the CPU kernels' (and the torch stages') numbers bit for bit.
#ifdef __CUDA_ARCH__
DPM_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
DPM_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
DPM_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
DPM_HD double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
DPM_HD float mul_rn(float a, float b) { return a * b; }
DPM_HD double mul_rn(double a, double b) { return a * b; }
DPM_HD float add_rn(float a, float b) { return a + b; }
DPM_HD double add_rn(double a, double b) { return a + b; }
#endif
template <typename A> DPM_HD A sub_rn(A a, A b) { return add_rn(a, -b); }

// The row of the CSR entry e: the last r < rows with row_ptr[r] <= e (empty rows are skipped).
DPM_HD int64_t row_of_entry(const int64_t* row_ptr, int64_t rows, int64_t e) {
  int64_t lo = 0, hi = rows;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (row_ptr[mid] <= e) lo = mid;
    else hi = mid;
  }
  return lo;
}

DPM_HD bool contains(const int64_t* items, int64_t size, int64_t v) {
  for (int64_t p = 0; p < size; ++p)
    if (items[p] == v) return true;
  return false;
}

// i in N(j, k)? (the first `count` entries of row j)
DPM_HD bool in_first(const int64_t* neighbours, int64_t width, int64_t j, int64_t count, int64_t i) {
  return contains(neighbours + j * width, count, i);
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

// expanded_set's membership tests by scanning the sets (tens of items), with no scratch: any device.
struct ScanSets {
  DPM_HD void start(int64_t) {}
  DPM_HD void add_own(int64_t) {}
  DPM_HD void add_out(int64_t) {}
  DPM_HD bool is_own(const int64_t* own, int64_t own_size, int64_t v) const { return contains(own, own_size, v); }
  DPM_HD bool in_out(const int64_t* out, int64_t size, int64_t v) const { return contains(out, size, v); }
};

// R*(i): R(i, k1) united with every R(c, kh), c in R(i, k1), with 3 |R(c, kh) & R(i, k1)| >
// 2 |R(c, kh)|; unique and sorted ascending. half_sets / half_sizes: R(c, kh) of every item
// (row c at half_sets + c * count_h), computed once. `own` needs count1 slots, `out`
// count1 * (count_h + 1) (the most R* can hold). `sets` answers "in R(i, k1)?" and "in R*(i) so
// far?" (ScanSets, or a caller's O(1) marks). Returns |R*(i)|.
template <class Sets = ScanSets>
DPM_HD int64_t expanded_set(const int64_t* neighbours, int64_t width, int64_t i, int64_t count1, int64_t count_h,
                            const int64_t* half_sets, const int64_t* half_sizes, int64_t* own, int64_t* out,
                            Sets sets = {}) {
  sets.start(i);
  const int64_t own_size = reciprocal_set(neighbours, width, i, count1, own);
  int64_t size = 0;
  for (int64_t p = 0; p < own_size; ++p) {
    out[size++] = own[p];
    sets.add_own(own[p]);
  }
  for (int64_t p = 0; p < own_size; ++p) {
    const int64_t* half = half_sets + own[p] * count_h;
    const int64_t half_size = half_sizes[own[p]];
    int64_t overlap = 0;
    for (int64_t q = 0; q < half_size; ++q) overlap += sets.is_own(own, own_size, half[q]);
    if (3 * overlap > 2 * half_size)
      for (int64_t q = 0; q < half_size; ++q)
        if (!sets.in_out(out, size, half[q])) {
          out[size++] = half[q];
          sets.add_out(half[q]);
        }
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

// The squared distance of items r and c from the candidate lists of the scan ((N, m) values /
// indices) when either row's list holds the other (the scan's values are symmetric), else 0 for
// r == c: into *out, true; false when the features must give it.
DPM_HD bool listed_sqdist(const float* cand_values, const int64_t* cand_indices, int64_t m, int64_t r, int64_t c,
                          float* out) {
  for (int64_t p = 0; p < m; ++p)
    if (cand_indices[r * m + p] == c) return *out = cand_values[r * m + p], true;
  for (int64_t p = 0; p < m; ++p)
    if (cand_indices[c * m + p] == r) return *out = cand_values[c * m + p], true;
  if (c == r) return *out = 0.f, true;
  return false;
}

// |x_c|^2 - 2 x_r.x_c + |x_r|^2 as float32, clamped at 0, from the three sums taken in feature order
// (one add_rn of a mul_rn per feature).
template <typename A> DPM_HD float sqdist_from_sums(A dot, A r_norm, A c_norm) {
  const A squared = add_rn(sub_rn(c_norm, mul_rn(A(2), dot)), r_norm);
  return float(squared > A(0) ? squared : A(0));
}

// Squared Euclidean distance of items r and c as float32: listed_sqdist, else sqdist_from_sums of
// the (N, D) features.
template <typename A>
DPM_HD float pair_sqdist(const A* x, int64_t D, const float* cand_values, const int64_t* cand_indices, int64_t m,
                         int64_t r, int64_t c) {
  float listed;
  if (listed_sqdist(cand_values, cand_indices, m, r, c, &listed)) return listed;
  A dot = 0, nr = 0, nc = 0;
  for (int64_t d = 0; d < D; ++d) {
    const A xr = x[r * D + d], xc = x[c * D + d];
    dot = add_rn(dot, mul_rn(xr, xc));
    nr = add_rn(nr, mul_rn(xr, xr));
    nc = add_rn(nc, mul_rn(xc, xc));
  }
  return sqdist_from_sums(dot, nr, nc);
}

// One row of V_qe = the mean of the CSR rows V[sources[t]], t < k2 (cols ascending in each): a
// k2-way merge of those rows, each column's values summed in t order (as numpy's mean over axis
// 0) in float32, then divided by k2. cursor: 2 * k2 scratch slots (positions, then row ends).
// With out_cols == nullptr it only counts, without reading values (the CUDA count pass passes
// nullptr). Returns the number of columns of the row.
DPM_HD int64_t expansion_row(const int64_t* row_ptr, const int64_t* cols, const float* values, const int64_t* sources,
                             int64_t k2, int64_t* cursor, int64_t* out_cols, float* out_values) {
  int64_t* end = cursor + k2;
  for (int64_t t = 0; t < k2; ++t) {
    cursor[t] = row_ptr[sources[t]];
    end[t] = row_ptr[sources[t] + 1];
  }
  constexpr int64_t kDone = INT64_MAX;  // above every column: the head of an exhausted row
  int64_t size = 0;
  for (;;) {
    int64_t next = kDone;  // the smallest column not yet merged
    for (int64_t t = 0; t < k2; ++t) {
      const int64_t head = cursor[t] < end[t] ? cols[cursor[t]] : kDone;
      next = head < next ? head : next;
    }
    if (next == kDone) return size;
    float sum = 0.f;
    bool first = true;
    for (int64_t t = 0; t < k2; ++t)
      if (cursor[t] < end[t] && cols[cursor[t]] == next) {
        if (out_cols != nullptr) sum = first ? values[cursor[t]] : add_rn(sum, values[cursor[t]]);
        first = false;
        ++cursor[t];
      }
    if (out_cols != nullptr) {
      out_cols[size] = next;
      out_values[size] = sum / float(k2);
    }
    ++size;
  }
}

// One pair's share of the min-sum m: min(V[q, k], V[g, k]) (as std::min picks).
DPM_HD float min_share(float query_value, float gallery_value) {
  return gallery_value < query_value ? gallery_value : query_value;
}

// Jaccard distance from the min-sum m of two rows that both sum to 1, blended with the
// normalised distance d, in the reference's float order: (1 - m / (2 - m)) * (1 - lambda) + d * lambda.
template <typename A> DPM_HD A jaccard_blend(A m, A d, A jaccard_weight, A keep) {
  return add_rn(mul_rn(A(1) - m / (A(2) - m), jaccard_weight), mul_rn(d, keep));
}

// a where `pick`, else b. On the host through the bits, so that the compiler keeps both operands
// computed (it would branch around a division otherwise) and a loop of it vectorises.
DPM_HD float select_value(bool pick, float a, float b) {
#ifdef __CUDA_ARCH__
  return pick ? a : b;
#else
  uint32_t a_bits, b_bits;
  std::memcpy(&a_bits, &a, sizeof a);
  std::memcpy(&b_bits, &b, sizeof b);
  const uint32_t mask = 0u - uint32_t(pick);
  const uint32_t bits = (a_bits & mask) | (b_bits & ~mask);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
#endif
}

// The blended entry of one (query, gallery) pair with min-sum m: pairs sharing no column (m = 0,
// Jaccard 1) written as the reference computes them, jaccard_weight + d * lambda. Both are computed
// (m / (2 - m) is finite for any m a pair of rows gives), then one is selected.
DPM_HD float blend_entry(float m, float d, float jaccard_weight, float keep) {
  return select_value(m != 0.f, jaccard_blend(m, d, jaccard_weight, keep), add_rn(jaccard_weight, mul_rn(d, keep)));
}

// The Jaccard stage as query_gallery_sums (query_gallery_sums.h / .cuh): min-sums, then the blend with the
// normalised distance, first divided by row_scale[q] where given (the row-max normalisation, fused).
struct MinShare {
  DPM_HD float operator()(float query_value, float gallery_value) const {
    return min_share(query_value, gallery_value);
  }
};
struct JaccardFinish {
  const float* row_scale;  // or nullptr
  float jaccard_weight, keep;
  DPM_HD float operator()(int64_t q, float m, float d) const {
    return blend_entry(m, row_scale != nullptr ? d / row_scale[q] : d, jaccard_weight, keep);
  }
};

}  // namespace dpm_ops::kreciprocal
