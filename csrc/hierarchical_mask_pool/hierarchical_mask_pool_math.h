// Per-row maths of the hierarchical masked pooling, shared by the CPU and CUDA kernels.
//
// Level l is a map x (B, C_l, H_l, W_l); the optional foreground mask (B, 1, H, W) is resized to
// (H_l, W_l) by area averaging (adaptive average pooling: cell (h, w) averages the input rows
// [floor(h*H/H_l), ceil((h+1)*H/H_l)) and likewise the columns), giving weights w >= 0. Then
//   avg: v[b, c] = sum_hw w x / sum_hw w            (0 when sum_hw w == 0)
//   max: v[b, c] = max over {hw : w > 0} of x       (0 when that set is empty)
// and without a mask w == 1 (the plain global average / max pool). The levels' vectors are
// concatenated along channels into (B, sum_l C_l).
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace dpm_ops::hierarchical_mask_pool {

// The sums over a row's cells (its resized mask, its weighted values) are taken in fp64 for every
// input dtype: in fp32, in order (a SIMD lane's or a warp lane's share), a 2048 x 2048 map's average
// was 1e-4 off (torch's pairwise mean: 1e-7), and maps near fp32's largest values overflowed (their
// average is within range). The loops are bound by memory, so the wider adds cost nothing measurable.
using RowSum = double;

// One level of the packed launch. Rows are (level, b, c) flattened, level-major.
struct LevelDesc {
  const void* data;       // features (B, C, H, W), contiguous
  void* grad;             // its gradient (backward only)
  int64_t channels;       // C_l
  int64_t height, width;  // H_l, W_l
  int64_t row_begin;      // first global row of this level: sum_{j<l} B * C_j
  int64_t out_offset;     // first output column of this level: sum_{j<l} C_j
  int64_t weight_offset;  // first column of this level in the packed weights (B, sum_l H_l W_l)
};

// Every level of one launch, passed by value to the kernels (CUDA: as a kernel argument).
constexpr int kMaxLevels = 16;
struct LevelPack {
  LevelDesc level[kMaxLevels];
  int count;
  int64_t batch;
  int64_t total_channels;  // sum_l C_l: the output's columns
  int64_t total_hw;        // sum_l H_l W_l: the packed weights' columns
  int64_t total_rows;      // B * sum_l C_l
};

// The level holding global row `row` (levels are few: a linear scan).
DPM_HD int find_level(const LevelDesc* levels, int count, int64_t row) {
  int l = 0;
  while (l + 1 < count && row >= levels[l + 1].row_begin) ++l;
  return l;
}

// PyTorch's adaptive pooling bounds of output cell i of `out` cells over `in` inputs: [start, end).
DPM_HD int64_t cell_start(int64_t i, int64_t out, int64_t in) { return (i * in) / out; }
DPM_HD int64_t cell_end(int64_t i, int64_t out, int64_t in) { return ((i + 1) * in + out - 1) / out; }

// The mask resized to (Hl, Wl), cell (h, w): the mean of its input area. `load(i)` reads the
// mask plane (H, W) at flat index i in the accumulation type.
template <typename A, typename Load>
DPM_HD A area_weight(Load load, int64_t H, int64_t W, int64_t Hl, int64_t Wl, int64_t h, int64_t w) {
  const int64_t h0 = cell_start(h, Hl, H), h1 = cell_end(h, Hl, H);
  const int64_t w0 = cell_start(w, Wl, W), w1 = cell_end(w, Wl, W);
  A sum = A(0);
  for (int64_t i = h0; i < h1; ++i)
    for (int64_t j = w0; j < w1; ++j) sum += load(i * W + j);
  return sum / A((h1 - h0) * (w1 - w0));
}

// Whether a position takes part in the masked max (and gets its gradient).
template <typename A> DPM_HD bool selected(A weight) { return weight > A(0); }

// The running max, propagating NaN like torch.amax.
template <typename A> DPM_HD A max_update(A best, A v) { return (v > best || v != v) ? v : best; }

// The avg result (and the scale of its gradient): an empty (all-zero) weight pools to 0.
template <typename A> DPM_HD A safe_divide(A num, A weight_sum) {
  return weight_sum > A(0) ? num / weight_sum : A(0);
}

// Backward of one element: avg  d v / d x = w / sum w;
// max  torch.amax's rule: the gradient is shared evenly by the `ties` selected maxima.
template <typename A> DPM_HD A avg_grad(A g, A weight, A weight_sum) { return safe_divide(g * weight, weight_sum); }
template <typename A> DPM_HD A max_grad(A g, A x, A out, A weight, int64_t ties) {
  return (selected(weight) && x == out && ties > 0) ? g / A(ties) : A(0);
}

}  // namespace dpm_ops::hierarchical_mask_pool
