// CUDA entry points of the distance + top-k: ATen prepares the operands (compute type, unit rows
// for cosine, squared norms), cuBLAS computes the dot products a block of rows at a time (on tensor
// cores as common/gemm.h says), and the torch-free selection kernel (knn_kernels.cu) turns each block
// into distances and merges them into the rows' sorted lists. Built only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "knn_cuda.h"
#include "knn_math.h"
#include "knn_operands.h"
#include "../common/aten_cuda.h"
#include "../common/gemm.h"
#include "../common/no_autocast.h"
#include "../common/register_kernels.h"

namespace dpm_ops::knn {
namespace {

// Bound on the (rows, N) block of dot products held at a time.
constexpr int64_t kBlockBytes = int64_t(512) << 20;

// The GEMM operands: bf16 / fp16 inputs of one dtype stay in it (tensor cores, fp32 products).
at::ScalarType gemm_type(const at::Tensor& x, const at::Tensor& y, at::ScalarType compute) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) && y.scalar_type() == t ? t : compute;
}

// Every row of xs against every row of ys, a block of rows per GEMM + selection launch; the
// optional outputs (row_max, cross) as cuda::select says.
void scan(const Operand& xs, const Operand& ys, int64_t k, Metric metric, bool self, at::Tensor& values,
          at::Tensor& indices, void* row_max, void* cross, int64_t cross_rows) {
  const int64_t M = xs.rows.size(0), N = ys.rows.size(0);
  if (M == 0) return;
  const at::ScalarType acc = xs.norms.scalar_type();
  const int64_t chunk = std::clamp<int64_t>(kBlockBytes / (N * int64_t(at::elementSize(acc))), 1, M);
  at::Tensor dots = at::empty({chunk, N}, xs.rows.options().dtype(acc));
  for (int64_t r0 = 0; r0 < M; r0 += chunk) {
    const int64_t n = std::min(chunk, M - r0);
    at::Tensor block = dots.narrow(0, 0, n);
    mm_acc_out(block, xs.gemm.narrow(0, r0, n), ys.gemm.t());
    cuda::select(dtype_of(acc), block.const_data_ptr(), xs.norms.const_data_ptr(), ys.norms.const_data_ptr(), n, r0,
                 N, k, int(metric), self, values.data_ptr(), indices.data_ptr<int64_t>(), row_max, cross, cross_rows,
                 current_stream());
  }
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                            c10::string_view metric_name) {
  check_knn_args(x, y, k);
  TORCH_CHECK_VALUE(k <= cuda::kMaxSharedK, "knn: the CUDA kernel takes k <= ", cuda::kMaxSharedK, ", got ", k);
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocastGuard no_autocast;
  const Metric metric = parse_metric(metric_name);
  const at::ScalarType type = compute_type(x.scalar_type(), y.scalar_type());
  const at::ScalarType operand = gemm_type(x, y, type);
  const Operand xs(x, metric, type, operand), ys(y, metric, type, operand);
  at::Tensor values = at::empty({x.size(0), k}, x.options().dtype(type));
  at::Tensor indices = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  scan(xs, ys, k, metric, false, values, indices, nullptr, nullptr, 0);
  return {values, indices};
}

// Unlike the CPU kernel (upper-triangle tiles offered to rows and columns), every row is scanned
// in full here: lists of other blocks' rows cannot be shared between thread blocks without races.
// That is the full GEMM (twice the CPU's), and d(i, j), d(j, i) are two cuBLAS entries, equal in
// exact arithmetic but not promised to be bitwise equal. The (value / row max, index) order is
// applied afterwards to k + margin raw candidates, and rows it cannot decide are recomputed whole
// (as on the CPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_knn_cuda(const at::Tensor& x, int64_t k,
                                                                         c10::string_view metric_name, bool normalize,
                                                                         int64_t cross_rows) {
  check_self_knn_args(x, k, cross_rows);
  const int64_t N = x.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocastGuard no_autocast;
  const Metric metric = parse_metric(metric_name, "self_knn");
  const at::ScalarType type = compute_type(x.scalar_type());
  const Operand xs(x, metric, type, gemm_type(x, x, type));
  const int64_t m = normalize ? std::min(N, k + kTieMargin) : k;
  TORCH_CHECK_VALUE(m <= cuda::kMaxSharedK, "self_knn: the CUDA kernel takes k <= ",
                    cuda::kMaxSharedK - (normalize ? kTieMargin : 0),
                    normalize ? " with normalize (it keeps k + 4 neighbours)" : "", ", got ", k);
  at::Tensor raw = at::empty({N, m}, x.options().dtype(type));
  at::Tensor raw_indices = at::empty({N, m}, x.options().dtype(at::kLong));
  at::Tensor row_max = at::empty({N}, x.options().dtype(type));
  at::Tensor cross = at::empty({cross_rows, N - cross_rows}, x.options().dtype(type));
  scan(xs, xs, m, metric, true, raw, raw_indices, row_max.data_ptr(), cross_rows > 0 ? cross.data_ptr() : nullptr,
       cross_rows);
  if (!normalize) return {raw, raw_indices, row_max, cross};

  const at::Tensor scale = at::where(row_max > 0, row_max, at::ones_like(row_max)).unsqueeze(1);
  // Order by (scaled value, index): by index first, then a stable sort by the scaled value.
  const at::Tensor by_index = raw_indices.argsort(/*dim=*/1, /*descending=*/false);
  at::Tensor indices = raw_indices.gather(1, by_index), values = raw.gather(1, by_index);
  const at::Tensor by_value = std::get<1>((values / scale).sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
  indices = indices.gather(1, by_value).narrow(1, 0, k).contiguous();
  values = values.gather(1, by_value).narrow(1, 0, k).contiguous();
  if (m < N) {
    const at::Tensor kth = values.select(1, k - 1).unsqueeze(1) / scale;
    const at::Tensor undecided = at::nonzero((kth >= raw.select(1, m - 1).unsqueeze(1) / scale).squeeze(1)).squeeze(1);
    recompute_undecided(xs, undecided, k, metric, row_max, values, indices);
  }
  return {values, indices, row_max, cross};
}

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "knn", &knn_cuda,
                "self_knn", &self_knn_cuda)

}  // namespace dpm_ops::knn
