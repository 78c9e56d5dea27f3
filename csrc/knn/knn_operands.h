// ATen-side preparation shared by the CPU and CUDA entry points of the fused distance + top-k:
// argument checks, the metric, and the operands in the compute type.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "../common/compute_type.h"
#include "knn_math.h"

namespace dpm_ops::knn {

constexpr int64_t kTieMargin = 4;  // self_knn with row-max normalisation: extra candidates
constexpr int64_t kFullRowBatch = 64;  // rows per GEMM when whole rows are recomputed
constexpr int64_t kNormChunk = 1 << 18;  // elements per chunk of squared_row_norms

// torch's (rows * rows).sum(1), bit for bit. On the CPU in chunks of rows, so that no (N, D)
// temporary is allocated (its first touch cost as much as the sums): each row's sum is one serial
// reduction there whatever the chunk, as long as a chunk has two rows or more (a single output
// would split its row between threads).
inline at::Tensor squared_row_norms(const at::Tensor& rows) {
  const int64_t N = rows.size(0), D = rows.size(1);
  if (!rows.is_cpu() || N * D <= kNormChunk) return (rows * rows).sum(1).contiguous();
  const int64_t chunk = std::max<int64_t>(2, kNormChunk / std::max<int64_t>(D, 1));
  at::Tensor norms = at::empty({N}, rows.options());
  at::Tensor squares = at::empty({chunk + 1, D}, rows.options());
  for (int64_t begin = 0; begin < N;) {
    const int64_t count = N - begin == chunk + 1 ? chunk + 1 : std::min(chunk, N - begin);
    const at::Tensor part = rows.narrow(0, begin, count);
    at::Tensor out = norms.narrow(0, begin, count), square = squares.narrow(0, 0, count);
    at::sum_out(out, at::mul_out(square, part, part), 1);
    begin += count;
  }
  return norms;
}

// `op`: the op the message names (knn or self_knn).
inline Metric parse_metric(c10::string_view name, const char* op = "knn") {
  if (name == "euclidean") return Metric::kEuclidean;
  if (name == "sqeuclidean") return Metric::kSqEuclidean;
  if (name == "cosine") return Metric::kCosine;
  TORCH_CHECK_VALUE(false, op, ": metric must be one of euclidean, sqeuclidean, cosine, got ", name);
}

inline void check_features(const at::Tensor& t, const char* name, const char* op = "knn") {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D (rows, features), got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
                    t.scalar_type());
}

inline void check_knn_args(const at::Tensor& x, const at::Tensor& y, int64_t k) {
  check_features(x, "x");
  check_features(y, "y");
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), "knn: x and y must have the same feature dimension, got ", x.size(1),
                    " and ", y.size(1));
  TORCH_CHECK_VALUE(k >= 1 && k <= y.size(0), "knn: k must be in [1, rows of y = ", y.size(0), "], got ", k);
}

inline void check_self_knn_args(const at::Tensor& x, int64_t k, int64_t cross_rows) {
  check_features(x, "x", "self_knn");
  const int64_t N = x.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "self_knn: k must be in [1, rows of x = ", N, "], got ", k);
  TORCH_CHECK_VALUE(cross_rows >= 0 && cross_rows <= N, "self_knn: cross_rows must be in [0, ", N, "], got ",
                    cross_rows);
}

// Rows in the compute type (unit rows for cosine, with F.normalize's eps), their squared norms, and
// the rows as GEMM operand in `gemm_type` (the compute type, or bf16 / fp16 for tensor cores:
// common/gemm.h; then the same tensor, or the rows rounded to it).
struct Operand {
  at::Tensor rows, norms, gemm;
  Operand(const at::Tensor& v, Metric metric, at::ScalarType type, at::ScalarType gemm_type) {
    rows = v.detach().to(type).contiguous();  // the op's autograd is registered apart
    if (metric == Metric::kCosine) rows = (rows / rows.norm(2, {1}, true).clamp_min(1e-12)).contiguous();
    norms = squared_row_norms(rows);
    gemm = rows.to(gemm_type);
  }
  Operand(const at::Tensor& v, Metric metric, at::ScalarType type) : Operand(v, metric, type, type) {}
  // The rows `ids` (int64) only.
  Operand take(const at::Tensor& ids) const {
    return Operand(rows.index_select(0, ids), norms.index_select(0, ids), gemm.index_select(0, ids));
  }

 private:
  Operand(at::Tensor r, at::Tensor n, at::Tensor g) : rows(std::move(r)), norms(std::move(n)), gemm(std::move(g)) {}
};

// The self_knn rows `ids` (int64, on xs's device) whose first k by (value / row max, index) the kept
// candidates could not decide (scaled_order_is_decided): each recomputed from its whole row of
// distances, written into values / indices (N, k). The scans' GEMM on the same operands and
// pair_distance's formula, so the numbers are the scans'; the same code on every device.
inline void recompute_undecided(const Operand& xs, const at::Tensor& ids, int64_t k, Metric metric,
                                const at::Tensor& row_max, at::Tensor& values, at::Tensor& indices) {
  const at::ScalarType acc = xs.norms.scalar_type();
  for (int64_t b = 0; b < ids.size(0); b += kFullRowBatch) {
    const at::Tensor rows = ids.narrow(0, b, std::min(kFullRowBatch, ids.size(0) - b));
    const at::Tensor a = xs.gemm.index_select(0, rows);
    at::Tensor d = a.scalar_type() == acc ? at::mm(a, xs.gemm.t()) : at::mm(a, xs.gemm.t(), acc);
    if (metric == Metric::kCosine) {
      d = 1 - d;
    } else {
      d = xs.norms.index_select(0, rows).unsqueeze(1) + xs.norms.unsqueeze(0) - 2 * d;
      d = at::where(d > 0, d, 0);  // pair_distance's clamp
      if (metric == Metric::kEuclidean) d = d.sqrt();
    }
    d.scatter_(1, rows.unsqueeze(1), 0);  // d(i, i) = 0
    const at::Tensor top = row_max.index_select(0, rows).unsqueeze(1);
    const at::Tensor scaled = d / at::where(top > 0, top, 1);  // an all-zero row keeps its raw order
    // All three arguments: sort(true, 1) would bind to sort(dim = 1, descending = true).
    const at::Tensor order = std::get<1>(scaled.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false)).narrow(1, 0, k);
    indices.index_copy_(0, rows, order);
    values.index_copy_(0, rows, d.gather(1, order));
  }
}

}  // namespace dpm_ops::knn
