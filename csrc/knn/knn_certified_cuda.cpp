// CUDA entry points of the certified search's two stages on backend "cuda" (the pipeline around them
// is torch ops: ops/knn_certified.py). dpm_ops::knn_certified_candidates (stage 1): cuBLAS computes
// the bf16 dot products a block of rows at a time (fp32 accumulation and output: common/gemm.h), and
// the torch-free kernel (knn_certified_kernels.cu) turns each block into the rows' candidate buffers
// without writing the bounds. dpm_ops::knn_certified_candidate_distances (stage 2): one kernel reads
// each row's counted candidates. Built only with CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "knn_certified_cuda.h"
#include "knn_cuda.h"
#include "knn_operands.h"
#include "../common/aten_cuda.h"
#include "../common/gemm.h"
#include "../common/no_autocast.h"
#include "../common/register_kernels.h"

namespace dpm_ops::knn {
namespace {

// Bound on the (rows, N) block of fp32 dot products held at a time.
constexpr int64_t kBlockBytes = int64_t(512) << 20;

void check_rows(const at::Tensor& rows, const at::Tensor& norms, const at::Tensor& scales, const char* name,
                const at::Device device) {
  for (const at::Tensor* t : {&rows, &norms, &scales})
    TORCH_CHECK_VALUE(t->device() == device, "knn_certified_candidates: every tensor must be on ", device,
                      ", got ", name, " arguments on ", t->device());
  TORCH_CHECK_VALUE(rows.dim() == 2 && rows.scalar_type() == at::kBFloat16,
                    "knn_certified_candidates: ", name, " must be 2-D bfloat16 rows, got ", rows.dim(), "-D ",
                    rows.scalar_type());
  TORCH_CHECK_VALUE(norms.dim() == 1 && norms.size(0) == rows.size(0) &&
                        (norms.scalar_type() == at::kFloat || norms.scalar_type() == at::kDouble),
                    "knn_certified_candidates: ", name, "_norms must be ", rows.size(0),
                    " float32 / float64 squared norms, got shape ", norms.sizes(), " ", norms.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.size(0) == rows.size(0) && scales.scalar_type() == at::kFloat,
                    "knn_certified_candidates: ", name, "_scales must be ", rows.size(0),
                    " float32 scales, got shape ", scales.sizes(), " ", scales.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> knn_certified_candidates_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_norms, const at::Tensor& y_norms,
    const at::Tensor& x_scales, const at::Tensor& y_scales, int64_t k, int64_t cap, c10::string_view metric_name,
    bool self_pairs) {
  check_rows(x, x_norms, x_scales, "x", x.device());
  check_rows(y, y_norms, y_scales, "y", x.device());
  const int64_t M = x.size(0), N = y.size(0);
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), "knn_certified_candidates: x and y must have the same feature dimension, got ",
                    x.size(1), " and ", y.size(1));
  TORCH_CHECK_VALUE(x_norms.scalar_type() == y_norms.scalar_type(),
                    "knn_certified_candidates: x_norms and y_norms must have one dtype, got ", x_norms.scalar_type(),
                    " and ", y_norms.scalar_type());
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min(N, cuda::kMaxSharedK), "knn_certified_candidates: k must be in [1, ",
                    std::min(N, cuda::kMaxSharedK), "], got ", k);
  TORCH_CHECK_VALUE(cap >= 1 && cap <= N, "knn_certified_candidates: cap must be in [1, rows of y = ", N, "], got ",
                    cap);
  TORCH_CHECK_VALUE(!self_pairs || M == N, "knn_certified_candidates: self_pairs needs x and y of as many rows, got ",
                    M, " and ", N);
  const Metric metric = parse_metric(metric_name);
  const c10::cuda::CUDAGuard guard(x.device());
  const NoAutocastGuard no_autocast;
  const at::TensorOptions ints = x.options().dtype(at::kInt);
  at::Tensor near = at::empty({M, cap}, ints), near_count = at::empty({M}, ints);
  const int64_t far_rows = self_pairs ? M : 0;
  at::Tensor far = at::empty({far_rows, cap}, ints), far_count = at::empty({far_rows}, ints);
  if (M == 0) return {near, near_count, far, far_count};

  const at::Tensor xs = x.contiguous(), ys = y.contiguous(), x_scale = x_scales.contiguous();
  const at::Tensor y_scale = y_scales.contiguous(), x_norm = x_norms.contiguous(), y_norm = y_norms.contiguous();
  const int64_t chunk = std::clamp<int64_t>(kBlockBytes / (N * int64_t(sizeof(float))), 1, M);
  at::Tensor dots = at::empty({chunk, N}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < M; r0 += chunk) {
    const int64_t n = std::min(chunk, M - r0);
    at::Tensor block = dots.narrow(0, 0, n);
    mm_acc_out(block, xs.narrow(0, r0, n), ys.t());
    cuda::certified_candidates(dtype_of(x_norm), block.const_data_ptr<float>(), x_scale.const_data_ptr<float>(),
                               y_scale.const_data_ptr<float>(), x_norm.const_data_ptr(), y_norm.const_data_ptr(), n, r0,
                               N, k, cap, int(metric), self_pairs, near.data_ptr<int32_t>(),
                               near_count.data_ptr<int32_t>(), self_pairs ? far.data_ptr<int32_t>() : nullptr,
                               self_pairs ? far_count.data_ptr<int32_t>() : nullptr, current_stream());
  }
  return {near, near_count, far, far_count};
}

at::Tensor knn_certified_candidate_distances_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_norms,
                                                  const at::Tensor& y_norms, const at::Tensor& rows,
                                                  const at::Tensor& candidates, const at::Tensor& counts,
                                                  c10::string_view metric_name, bool self_pairs) {
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK_VALUE(type == at::kFloat || type == at::kDouble, "knn_certified_candidate_distances: x must be ",
                    "float32 or float64 rows, got ", type);
  for (const at::Tensor* t : {&y, &x_norms, &y_norms})
    TORCH_CHECK_VALUE(t->scalar_type() == type && t->device() == x.device(),
                      "knn_certified_candidate_distances: y and the norms must be ", type, " on ", x.device(),
                      " as x, got ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2 && x.size(1) == y.size(1) && x_norms.numel() == x.size(0) &&
                        y_norms.numel() == y.size(0),
                    "knn_certified_candidate_distances: x (M, D), y (N, D) and their norms (M), (N) expected, got ",
                    x.sizes(), ", ", y.sizes(), ", ", x_norms.sizes(), ", ", y_norms.sizes());
  TORCH_CHECK_VALUE(candidates.dim() == 2 && rows.dim() == 1 && counts.dim() == 1 &&
                        rows.size(0) == candidates.size(0) && counts.size(0) == candidates.size(0),
                    "knn_certified_candidate_distances: rows (R), candidates (R, C) and counts (R) expected, got ",
                    rows.sizes(), ", ", candidates.sizes(), ", ", counts.sizes());
  for (const at::Tensor* t : {&rows, &candidates, &counts})
    TORCH_CHECK_VALUE(!at::isFloatingType(t->scalar_type()) && t->device() == x.device(),
                      "knn_certified_candidate_distances: rows, candidates and counts must be integer tensors on ",
                      x.device(), ", got ", t->scalar_type(), " on ", t->device());
  const Metric metric = parse_metric(metric_name);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(candidates.sizes(), x.options());
  const at::Tensor xs = x.contiguous(), ys = y.contiguous(), xn = x_norms.contiguous(), yn = y_norms.contiguous();
  const at::Tensor row = rows.to(at::kLong).contiguous(), columns = candidates.to(at::kLong).contiguous();
  const at::Tensor count = counts.to(at::kLong).contiguous();
  cuda::candidate_distances(dtype_of(type), xs.const_data_ptr(), ys.const_data_ptr(), xn.const_data_ptr(),
                            yn.const_data_ptr(), row.const_data_ptr<int64_t>(), columns.const_data_ptr<int64_t>(),
                            count.const_data_ptr<int64_t>(), candidates.size(0), candidates.size(1), x.size(1),
                            int(metric), self_pairs, out.data_ptr(), current_stream());
  return out;
}

}  // namespace

DPM_OPS_KERNELS(CUDA,
                "knn_certified_candidates", &knn_certified_candidates_cuda,
                "knn_certified_candidate_distances", &knn_certified_candidate_distances_cuda)

}  // namespace dpm_ops::knn
