// Per-row maths of MaskReID's ranking loss (maskreid.md §4.2, Eq. 5), shared by the CPU and CUDA
// kernels. For anchor k (a sample with at least one positive) of the similarity row s = S[k, :]:
//
//   z_j  = s_j − s_ref + α,      term(z) = exp(max(z, 0))  (literal)  |  exp(z)·[z > 0]  (violating_only)
//   L_k  = log(1 + Σ term(z)) + λ/(2|P|) Σ_{i∈P} (s_i − 1)²
//
// with s_ref the hardest positive (min over P, ties to the first index like torch.min) and the sum
// over negatives j, or (pos_mode "all") s_ref every positive i and the sum over all (i, j) pairs.
// Closed-form gradient (the same for both neg modes: relu's gradient at 0 is 0):
//   w(z) = exp(z)·[z > 0] / (1 + Σ term),
//   dL_k/ds_j = Σ_refs w(z)  (j ∈ N),   dL_k/ds_ref −= Σ_j w(z),   dL_k/ds_i += λ/|P| (s_i − 1)  (i ∈ P).
//
// Row functions walk columns start, start + step, ... and combine partial results with `reduce`
// (SerialReduce on the CPU: one thread per row; WarpReduce on the GPU: one warp per row).
#pragma once

#include <cstdint>

#include "../common/host_device.h"
#include "../common/math_functions.h"

namespace dpm_ops {
namespace maskreid_ranking {

template <typename A> struct Options {
  A alpha;
  A lam;
  bool violating_only;  // neg_mode "violating_only" (else "literal")
  bool all_positives;   // pos_mode "all" (else "hardest")
};

template <typename A> DPM_HD A hinge_term(A z, bool violating_only) {
  if (z > A(0)) return exponential(z);
  return violating_only ? A(0) : A(1);  // literal: a satisfied negative still adds exp(0) = 1
}

// d term / dz, without the 1/(1 + Σ term) of the log.
template <typename A> DPM_HD A hinge_weight(A z) { return z > A(0) ? exponential(z) : A(0); }

// The hardest-positive candidate; index −1 means none.
template <typename A> struct MinIndex {
  A value;
  int64_t index;
};

// The smaller similarity, ties to the smaller index (symmetric in its arguments).
struct PickMin {
  template <typename A> DPM_HD MinIndex<A> operator()(MinIndex<A> a, MinIndex<A> b) const {
    if (b.index < 0) return a;
    if (a.index < 0) return b;
    return (b.value < a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  }
};

DPM_HD bool is_positive(const int64_t* labels, int64_t k, int64_t c) { return c != k && labels[c] == labels[k]; }
DPM_HD bool is_negative(const int64_t* labels, int64_t k, int64_t c) { return labels[c] != labels[k]; }

// |P| of row k: the row is an anchor iff it is > 0.
template <class Reduce>
DPM_HD int64_t num_positives(const int64_t* labels, int64_t k, int64_t n, int64_t start, int64_t step,
                             const Reduce& reduce) {
  int64_t count = 0;
  for (int64_t c = start; c < n; c += step) count += is_positive(labels, k, c);
  return reduce.sum(count);
}

// Σ_{i∈P} w-numerator of the pairs (reference i, negative j = c) when c is negative, or of the
// pairs (reference c, every negative j) when c is positive: pos_mode "all"'s O(n) column sums.
template <typename A>
DPM_HD A all_pairs_column_weight(const A* s, const int64_t* labels, int64_t k, int64_t n, int64_t c, A alpha,
                                 bool c_negative) {
  A total = A(0);
  for (int64_t i = 0; i < n; ++i) {
    if (c_negative && is_positive(labels, k, i)) total += hinge_weight(s[c] - s[i] + alpha);
    if (!c_negative && is_negative(labels, k, i)) total += hinge_weight(s[i] - s[c] + alpha);
  }
  return total;
}

// Loss of row k times `scale` (1 / number of anchors), 0 for a non-anchor; with `coef` non-null also
// writes the row's dL/dS (times scale) at the columns this thread walks.
template <typename A, class Reduce>
DPM_HD A row_loss(const A* s, const int64_t* labels, int64_t k, int64_t n, const Options<A>& o, A scale,
                  int64_t start, int64_t step, const Reduce& reduce, A* coef) {
  // Positives: count, hardest, and the pull term's sum of squares.
  int64_t num_pos = 0;
  MinIndex<A> hardest{A(0), -1};
  A pull = A(0);
  for (int64_t c = start; c < n; c += step) {
    if (!is_positive(labels, k, c)) continue;
    ++num_pos;
    hardest = PickMin()(hardest, MinIndex<A>{s[c], c});
    pull += (s[c] - A(1)) * (s[c] - A(1));
  }
  num_pos = reduce.sum(num_pos);
  if (num_pos == 0) {  // not an anchor: no loss, no gradient
    if (coef != nullptr)
      for (int64_t c = start; c < n; c += step) coef[c] = A(0);
    return A(0);
  }
  hardest = reduce.pick(hardest, PickMin());
  pull = reduce.sum(pull);

  // The hinge sum, and (hardest mode) the weight the hardest positive collects.
  A total = A(0), weight_total = A(0);
  for (int64_t c = start; c < n; c += step) {
    if (!is_negative(labels, k, c)) continue;
    if (o.all_positives) {
      for (int64_t i = 0; i < n; ++i)
        if (is_positive(labels, k, i)) total += hinge_term(s[c] - s[i] + o.alpha, o.violating_only);
    } else {
      const A z = s[c] - hardest.value + o.alpha;
      total += hinge_term(z, o.violating_only);
      weight_total += hinge_weight(z);
    }
  }
  total = reduce.sum(total);
  weight_total = reduce.sum(weight_total);
  const A pos = A(num_pos);
  const A loss = (log_one_plus(total) + o.lam / (A(2) * pos) * pull) * scale;
  if (coef == nullptr) return loss;

  const A inv = scale / (A(1) + total), pull_coef = scale * o.lam / pos;
  for (int64_t c = start; c < n; c += step) {
    A g = A(0);
    if (is_negative(labels, k, c)) {
      g = inv * (o.all_positives ? all_pairs_column_weight(s, labels, k, n, c, o.alpha, true)
                                 : hinge_weight(s[c] - hardest.value + o.alpha));
    } else if (c != k) {  // a positive
      g = pull_coef * (s[c] - A(1));
      if (o.all_positives)
        g -= inv * all_pairs_column_weight(s, labels, k, n, c, o.alpha, false);
      else if (c == hardest.index)
        g -= inv * weight_total;
    }
    coef[c] = g;
  }
  return loss;
}

}  // namespace maskreid_ranking
}  // namespace dpm_ops
