// CUDA entry points of the fused distance + top-k: ATen prepares the operands (compute type, unit
// rows for cosine, squared norms) and the torch-free kernel (knn_cuda.cu) does the rest. Built
// only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "knn_cuda.h"
#include "knn_math.h"
#include "knn_operands.h"
#include "../common/aten_cuda.h"

namespace dpm_ops {
namespace knn {
namespace {

std::tuple<at::Tensor, at::Tensor> knn_cuda(const at::Tensor& x, const at::Tensor& y, int64_t k,
                                            c10::string_view metric_name) {
  check_knn_args(x, y, k);
  TORCH_CHECK_VALUE(k <= cuda::kMaxSharedK, "knn: the CUDA kernel takes k <= ", cuda::kMaxSharedK, ", got ", k);
  const c10::cuda::CUDAGuard guard(x.device());
  const Metric metric = parse_metric(metric_name);
  const at::ScalarType type = compute_type(x.scalar_type() == at::kDouble ? x : y);
  const Operand xs(x, metric, type), ys(y, metric, type);
  at::Tensor values = at::empty({x.size(0), k}, x.options().dtype(type));
  at::Tensor indices = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  cuda::knn(dtype_of(type), xs.rows.const_data_ptr(), ys.rows.const_data_ptr(), xs.norms.const_data_ptr(),
            ys.norms.const_data_ptr(), x.size(0), y.size(0), x.size(1), k, int(metric), false, values.data_ptr(),
            indices.data_ptr<int64_t>(), nullptr, nullptr, 0, current_stream());
  return {values, indices};
}

// On the GPU every tile is computed (no column offers: lists of other blocks' rows would race);
// the (value / row max, index) order is applied afterwards to k + margin raw candidates, and
// rows it cannot decide are recomputed whole (as on the CPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> self_knn_cuda(const at::Tensor& x, int64_t k,
                                                                         c10::string_view metric_name, bool normalize,
                                                                         int64_t cross_rows) {
  check_self_knn_args(x, k, cross_rows);
  const int64_t N = x.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  const Metric metric = parse_metric(metric_name);
  const at::ScalarType type = compute_type(x);
  const Operand xs(x, metric, type);
  const int64_t m = normalize ? std::min(N, k + kTieMargin) : k;
  TORCH_CHECK_VALUE(m <= cuda::kMaxSharedK, "self_knn: the CUDA kernel takes k <= ", cuda::kMaxSharedK - kTieMargin);
  at::Tensor raw = at::empty({N, m}, x.options().dtype(type));
  at::Tensor raw_indices = at::empty({N, m}, x.options().dtype(at::kLong));
  at::Tensor row_max = at::empty({N}, x.options().dtype(type));
  at::Tensor cross = at::empty({cross_rows, N - cross_rows}, x.options().dtype(type));
  cuda::knn(dtype_of(type), xs.rows.const_data_ptr(), xs.rows.const_data_ptr(), xs.norms.const_data_ptr(),
            xs.norms.const_data_ptr(), N, N, x.size(1), m, int(metric), true, raw.data_ptr(),
            raw_indices.data_ptr<int64_t>(), row_max.data_ptr(), cross_rows > 0 ? cross.data_ptr() : nullptr,
            cross_rows, current_stream());
  if (!normalize) return {raw, raw_indices, row_max, cross};

  const at::Tensor scale = at::where(row_max > 0, row_max, at::ones_like(row_max)).unsqueeze(1);
  // Order by (scaled value, index): by index first, then a stable sort by the scaled value.
  const at::Tensor by_index = raw_indices.argsort(/*dim=*/1, /*descending=*/false);
  at::Tensor indices = raw_indices.gather(1, by_index), values = raw.gather(1, by_index);
  const at::Tensor by_value = std::get<1>((values / scale).sort(/*stable=*/true, 1));
  indices = indices.gather(1, by_value).narrow(1, 0, k).contiguous();
  values = values.gather(1, by_value).narrow(1, 0, k).contiguous();
  if (m < N) {
    const at::Tensor kth = values.select(1, k - 1).unsqueeze(1) / scale;
    const at::Tensor undecided = at::nonzero((kth >= raw.select(1, m - 1).unsqueeze(1) / scale).squeeze(1)).squeeze(1);
    if (undecided.numel() > 0) {
      at::Tensor full = at::mm(xs.rows.index_select(0, undecided), xs.rows.t());
      if (metric == Metric::kCosine) {
        full = 1 - full;
      } else {
        full = (xs.norms.index_select(0, undecided).unsqueeze(1) + xs.norms.unsqueeze(0) - 2 * full).clamp_min(0);
        if (metric == Metric::kEuclidean) full = full.sqrt();
      }
      full.scatter_(1, undecided.unsqueeze(1), 0);
      const at::Tensor order = std::get<1>((full / scale.index_select(0, undecided)).sort(true, 1)).narrow(1, 0, k);
      indices.index_copy_(0, undecided, order);
      values.index_copy_(0, undecided, full.gather(1, order));
    }
  }
  return {values, indices, row_max, cross};
}

}  // namespace

TORCH_LIBRARY_IMPL(dpm_ops, CUDA, m) {
  m.impl("knn", &knn_cuda);
  m.impl("self_knn", &self_knn_cuda);
}

}  // namespace knn
}  // namespace dpm_ops
