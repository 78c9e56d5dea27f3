// Argument checks shared by the CPU and CUDA entry points of the k-reciprocal stages (the index and CSR
// checks: ../common/csr_checks.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "../common/compute_type.h"
#include "../common/csr_checks.h"

namespace dpm_ops::kreciprocal {

constexpr const char* kOp = "kreciprocal";

// pair_sqdist's arguments: (N, D) features, (N, m) candidate lists and a CSR of pairs over N items.
inline void check_pair_sqdist(const at::Tensor& features, const at::Tensor& cand_values,
                              const at::Tensor& cand_indices, const at::Tensor& row_ptr, const at::Tensor& cols) {
  TORCH_CHECK_VALUE(features.dim() == 2 && at::isFloatingType(features.scalar_type()),
                    "kreciprocal: features must be a 2-D floating tensor");
  const int64_t N = features.size(0);
  check_index_tensor(kOp, cand_indices, 2, "cand_indices");
  TORCH_CHECK_VALUE(cand_indices.size(0) == N && cand_values.sizes() == cand_indices.sizes(),
                    "kreciprocal: cand_values and cand_indices must both be (", N, ", m), got ", cand_values.sizes(),
                    " and ", cand_indices.sizes());
  check_index_range(kOp, cand_indices, N, "cand_indices");
  check_csr(kOp, row_ptr, cols, N, N);
}

// The checked, contiguous arguments of each stage (the CUDA entry points check devices and set the
// device guard first).
struct ExpandArgs {
  at::Tensor neighbours;
  int64_t N, width, count1, count_h;  // count1 / count_h: entries of N(i, k1) / N(i, half_k1) in a row
  ExpandArgs(const at::Tensor& neighbours_in, int64_t k1, int64_t half_k1) {
    check_neighbours(kOp, neighbours_in);
    TORCH_CHECK_VALUE(k1 >= 1 && half_k1 >= 0, "kreciprocal: need k1 >= 1 and half_k1 >= 0, got ", k1, ", ", half_k1);
    neighbours = neighbours_in.contiguous();
    N = neighbours.size(0);
    width = neighbours.size(1);
    count1 = std::min(k1 + 1, width);
    count_h = std::min(half_k1 + 1, width);
  }
};

struct PairSqdistArgs {
  at::Tensor features, cand_values, cand_indices, row_ptr, cols;  // features in the compute type, cand_values fp32
  PairSqdistArgs(const at::Tensor& features_in, const at::Tensor& cand_values_in, const at::Tensor& cand_indices_in,
                 const at::Tensor& row_ptr_in, const at::Tensor& cols_in) {
    check_pair_sqdist(features_in, cand_values_in, cand_indices_in, row_ptr_in, cols_in);
    features = as_compute(features_in);
    cand_values = cand_values_in.to(at::kFloat).contiguous();
    cand_indices = cand_indices_in.contiguous();
    row_ptr = row_ptr_in.contiguous();
    cols = cols_in.contiguous();
  }
};

struct QueryExpansionArgs {
  at::Tensor row_ptr, cols, values, sources;  // values fp32
  int64_t N, k2;
  QueryExpansionArgs(const at::Tensor& row_ptr_in, const at::Tensor& cols_in, const at::Tensor& values_in,
                     const at::Tensor& sources_in) {
    check_index_tensor(kOp, row_ptr_in, 1, "row_ptr");
    N = row_ptr_in.size(0) - 1;
    check_csr(kOp, row_ptr_in, cols_in, N, N, &values_in);
    check_index_tensor(kOp, sources_in, 2, "sources");
    TORCH_CHECK_VALUE(sources_in.size(0) == N, "kreciprocal: sources must have one row per item");
    check_index_range(kOp, sources_in, N, "sources");
    row_ptr = row_ptr_in.contiguous();
    cols = cols_in.contiguous();
    values = values_in.to(at::kFloat).contiguous();
    sources = sources_in.contiguous();
    k2 = sources.size(1);
  }
};

// out (Q, G) float32 with the CSR over its N = Q + G items, and the optional per-query row scale.
struct JaccardArgs : QueryGalleryCsr {
  at::Tensor scale;  // fp32; undefined when not given
  JaccardArgs(const at::Tensor& out, const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& values,
              const c10::optional<at::Tensor>& scale_in)
      : QueryGalleryCsr(kOp, out, row_ptr, cols, values) {
    if (scale_in.has_value()) {
      scale = scale_in->to(at::kFloat).contiguous();
      TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) >= Q, "kreciprocal: row_scale must hold one value per query");
    }
  }
  const float* scale_or_null() const { return scale.defined() ? scale.const_data_ptr<float>() : nullptr; }
};

}  // namespace dpm_ops::kreciprocal
