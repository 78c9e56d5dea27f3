// Per-row maths of MaskReID's ranking loss (its paper's Eq. 5 and the motivating variants), shared by the CPU and CUDA
// kernels. For anchor k (a sample with at least one positive) of the similarity row s = S[k, :], positives P (same
// identity, k excluded) and negatives N:
//
// Eq. 5 (pos_mode "hardest", and "all_eq5" = Eq. 5's terms over every positive):
//   z_j  = s_j − s_ref + α,      term(z) = exp(max(z, 0))  (literal)  |  exp(z)·[z > 0]  (violating_only)
//   L_k  = log(1 + Σ term(z)) + λ/(2|P|) Σ_{i∈P} (s_i − 1)²
// with s_ref the hardest positive (min over P, ties to the first index like torch.min) and the sum
// over negatives j ("hardest"), or s_ref every positive i and the sum over all (i, j) pairs ("all_eq5").
// Closed-form gradient (the same for both neg modes: relu's gradient at 0 is 0):
//   w(z) = exp(z)·[z > 0] / (1 + Σ term),
//   dL_k/ds_j = Σ_refs w(z)  (j ∈ N),   dL_k/ds_ref −= Σ_j w(z),   dL_k/ds_i += λ/|P| (s_i − 1)  (i ∈ P).
//
// Eq. 4 (pos_mode "eq4"; no α, hinge or λ): L_k = log(1 + Σ_{i∈P} Σ_{j∈N} exp(s_j − s_i)). The double
// sum factors into Σ_j exp(s_j) · Σ_i exp(−s_i), so with a = LSE_{j∈N} s_j and b = LSE_{i∈P} −s_i:
//   L_k = softplus(a + b),   dL_k/ds_j = σ(a + b)·softmax_N(s)_j,   dL_k/ds_i = −σ(a + b)·softmax_P(−s)_i,
// O(n) per row and stable for any similarity range; an anchor without negatives has L_k = 0.
//
// Row functions walk columns start, start + step, ... and combine partial results with `reduce`
// (SerialReduce on the CPU: one thread per row; WarpReduce on the GPU: one warp per row).
#pragma once

#include <cstdint>

#include "../common/host_device.h"
#include "../common/math_functions.h"

namespace dpm_ops::maskreid_ranking {

enum class PosMode { kHardest, kAllEq5, kEq4 };  // pos_mode "hardest" | "all_eq5" | "eq4"

template <typename A> struct Options {
  A alpha;              // Eq. 5 only
  A lam;                // Eq. 5 only
  bool violating_only;  // neg_mode "violating_only" (else "literal"); Eq. 5 only
  PosMode pos_mode;
};

template <typename A> Options<A> cast(const Options<double>& o) {
  return Options<A>{A(o.alpha), A(o.lam), o.violating_only, o.pos_mode};
}

template <typename A> DPM_HD A hinge_term(A z, bool violating_only) {
  if (z > A(0)) return exponential(z);
  return violating_only ? A(0) : A(1);  // literal: a satisfied negative still adds exp(0) = 1
}

// d term / dz, without the 1/(1 + Σ term) of the log.
template <typename A> DPM_HD A hinge_weight(A z) { return z > A(0) ? exponential(z) : A(0); }

// A similarity and its column (the hardest positive, Eq. 4's most similar negative); index −1 means none.
template <typename A> struct Candidate {
  A value;
  int64_t index;
};

// The smaller (kMin) or larger similarity, ties to the smaller index (symmetric in its arguments).
template <bool kMin> struct PickExtreme {
  template <typename A> DPM_HD Candidate<A> operator()(Candidate<A> a, Candidate<A> b) const {
    if (b.index < 0) return a;
    if (a.index < 0) return b;
    const bool better = kMin ? b.value < a.value : b.value > a.value;
    return (better || (b.value == a.value && b.index < a.index)) ? b : a;
  }
};
using PickMin = PickExtreme<true>;
using PickMax = PickExtreme<false>;

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
// pairs (reference c, every negative j) when c is positive: pos_mode "all_eq5"'s O(n) column sums.
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

template <typename A> DPM_HD void zero_row(A* coef, int64_t n, int64_t start, int64_t step) {
  if (coef != nullptr)
    for (int64_t c = start; c < n; c += step) coef[c] = A(0);
}

// Eq. 4's loss of anchor row k times `scale` (see the top), given its hardest positive (b's shift);
// with `coef` non-null also writes the row's dL/dS (times scale) at the columns this thread walks.
template <typename A, class Reduce>
DPM_HD A eq4_row_loss(const A* s, const int64_t* labels, int64_t k, int64_t n, A hardest, A scale, int64_t start,
                      int64_t step, const Reduce& reduce, A* coef) {
  Candidate<A> top{A(0), -1};  // the most similar negative: a's shift
  for (int64_t c = start; c < n; c += step)
    if (is_negative(labels, k, c)) top = PickMax()(top, Candidate<A>{s[c], c});
  top = reduce.pick(top, PickMax());
  if (top.index < 0) {  // no negative: log(1 + 0), no gradient
    zero_row(coef, n, start, step);
    return A(0);
  }
  A neg_sum = A(0), pos_sum = A(0);  // Σ_N exp(s_j − max), Σ_P exp(min − s_i): both in [1, n]
  for (int64_t c = start; c < n; c += step) {
    if (is_negative(labels, k, c)) neg_sum += exponential(s[c] - top.value);
    else if (is_positive(labels, k, c)) pos_sum += exponential(hardest - s[c]);
  }
  neg_sum = reduce.sum(neg_sum);
  pos_sum = reduce.sum(pos_sum);
  // a + b with the shifts' difference first: added to a large similarity one by one, the logs (the
  // set sizes at equal similarities) would round away.
  const A t = (top.value - hardest) + (logarithm(neg_sum) + logarithm(pos_sum));
  const A loss = softplus(t) * scale;
  if (coef == nullptr) return loss;

  const A g = sigmoid(t) * scale, neg_coef = g / neg_sum, pos_coef = g / pos_sum;
  for (int64_t c = start; c < n; c += step) {
    A v = A(0);
    if (is_negative(labels, k, c)) v = neg_coef * exponential(s[c] - top.value);
    else if (is_positive(labels, k, c)) v = -pos_coef * exponential(hardest - s[c]);
    coef[c] = v;
  }
  return loss;
}

// Loss of row k times `scale` (1 / number of anchors), 0 for a non-anchor; with `coef` non-null also
// writes the row's dL/dS (times scale) at the columns this thread walks.
template <typename A, class Reduce>
DPM_HD A row_loss(const A* s, const int64_t* labels, int64_t k, int64_t n, const Options<A>& o, A scale,
                  int64_t start, int64_t step, const Reduce& reduce, A* coef) {
  // Positives: count, hardest, and the pull term's sum of squares.
  int64_t num_pos = 0;
  Candidate<A> hardest{A(0), -1};
  A pull = A(0);
  for (int64_t c = start; c < n; c += step) {
    if (!is_positive(labels, k, c)) continue;
    ++num_pos;
    hardest = PickMin()(hardest, Candidate<A>{s[c], c});
    pull += (s[c] - A(1)) * (s[c] - A(1));
  }
  num_pos = reduce.sum(num_pos);
  if (num_pos == 0) {  // not an anchor: no loss, no gradient
    zero_row(coef, n, start, step);
    return A(0);
  }
  hardest = reduce.pick(hardest, PickMin());
  if (o.pos_mode == PosMode::kEq4)
    return eq4_row_loss(s, labels, k, n, hardest.value, scale, start, step, reduce, coef);
  pull = reduce.sum(pull);

  // The hinge sum, and (hardest mode) the weight the hardest positive collects.
  const bool all_pairs = o.pos_mode == PosMode::kAllEq5;
  A total = A(0), weight_total = A(0);
  for (int64_t c = start; c < n; c += step) {
    if (!is_negative(labels, k, c)) continue;
    if (all_pairs) {
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
      g = inv * (all_pairs ? all_pairs_column_weight(s, labels, k, n, c, o.alpha, true)
                                 : hinge_weight(s[c] - hardest.value + o.alpha));
    } else if (c != k) {  // a positive
      g = pull_coef * (s[c] - A(1));
      if (all_pairs)
        g -= inv * all_pairs_column_weight(s, labels, k, n, c, o.alpha, false);
      else if (c == hardest.index)
        g -= inv * weight_total;
    }
    coef[c] = g;
  }
  return loss;
}

}  // namespace dpm_ops::maskreid_ranking
