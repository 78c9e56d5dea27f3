// Argument checks shared by the CPU and CUDA entry points of the k-reciprocal stages. The ops are
// reachable from Python (torch.ops.dpm_ops.kreciprocal_*), so every index a kernel follows is
// range-checked once per call, before any kernel reads through it: O(size) ATen reductions on the
// tensor's own device (one small copy to the host each), negligible next to the stages.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "../common/compute_type.h"

namespace dpm_ops::kreciprocal {

inline void check_index_tensor(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim && t.scalar_type() == at::kLong, "kreciprocal: ", name, " must be a ", dim,
                    "-D int64 tensor, got ", t.sizes(), " ", t.scalar_type());
}

// Every entry of `index` lies in [0, limit).
inline void check_index_range(const at::Tensor& index, int64_t limit, const char* name) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const at::Tensor bounds = at::stack({lo, hi}).cpu();
  const int64_t low = bounds[0].item<int64_t>(), high = bounds[1].item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high < limit, "kreciprocal: ", name, " must hold indices in [0, ", limit,
                    "), got values in [", low, ", ", high, "]");
}

// (N, width) neighbour lists of N items: int64 item indices.
inline void check_neighbours(const at::Tensor& neighbours, const char* name = "neighbours") {
  check_index_tensor(neighbours, 2, name);
  check_index_range(neighbours, neighbours.size(0), name);
}

// A CSR of `rows` rows over columns [0, num_cols): row_ptr (rows + 1) starts at 0, never decreases
// and ends at cols.size(0); `values`, when given, has one entry per column entry.
inline void check_csr(const at::Tensor& row_ptr, const at::Tensor& cols, int64_t rows, int64_t num_cols,
                      const at::Tensor* values = nullptr) {
  check_index_tensor(row_ptr, 1, "row_ptr");
  check_index_tensor(cols, 1, "cols");
  TORCH_CHECK_VALUE(row_ptr.size(0) == rows + 1, "kreciprocal: row_ptr must have ", rows + 1, " entries, got ",
                    row_ptr.size(0));
  if (values != nullptr)
    TORCH_CHECK_VALUE(values->dim() == 1 && values->size(0) == cols.size(0), "kreciprocal: values must be 1-D with ",
                      cols.size(0), " entries like cols, got ", values->sizes());
  const at::Tensor steps = rows > 0 ? row_ptr.diff().min() : at::zeros({}, row_ptr.options());
  const at::Tensor ends = at::stack({row_ptr[0], row_ptr[rows], steps}).cpu();
  TORCH_CHECK_VALUE(ends[0].item<int64_t>() == 0 && ends[1].item<int64_t>() == cols.size(0) &&
                        ends[2].item<int64_t>() >= 0,
                    "kreciprocal: row_ptr must start at 0, never decrease and end at cols.size(0) = ", cols.size(0));
  check_index_range(cols, num_cols, "cols");
}

// pair_sqdist's arguments: (N, D) features, (N, m) candidate lists and a CSR of pairs over N items.
inline void check_pair_sqdist(const at::Tensor& features, const at::Tensor& cand_values,
                              const at::Tensor& cand_indices, const at::Tensor& row_ptr, const at::Tensor& cols) {
  TORCH_CHECK_VALUE(features.dim() == 2 && at::isFloatingType(features.scalar_type()),
                    "kreciprocal: features must be a 2-D floating tensor");
  const int64_t N = features.size(0);
  check_index_tensor(cand_indices, 2, "cand_indices");
  TORCH_CHECK_VALUE(cand_indices.size(0) == N && cand_values.sizes() == cand_indices.sizes(),
                    "kreciprocal: cand_values and cand_indices must both be (", N, ", m), got ", cand_values.sizes(),
                    " and ", cand_indices.sizes());
  check_index_range(cand_indices, N, "cand_indices");
  check_csr(row_ptr, cols, N, N);
}

// The checked, contiguous arguments of each stage (the CUDA entry points check devices and set the
// device guard first).
struct ExpandArgs {
  at::Tensor neighbours;
  int64_t N, width, count1, count_h;  // count1 / count_h: entries of N(i, k1) / N(i, half_k1) in a row
  ExpandArgs(const at::Tensor& neighbours_in, int64_t k1, int64_t half_k1) {
    check_neighbours(neighbours_in);
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
    check_index_tensor(row_ptr_in, 1, "row_ptr");
    N = row_ptr_in.size(0) - 1;
    check_csr(row_ptr_in, cols_in, N, N, &values_in);
    check_index_tensor(sources_in, 2, "sources");
    TORCH_CHECK_VALUE(sources_in.size(0) == N, "kreciprocal: sources must have one row per item");
    check_index_range(sources_in, N, "sources");
    row_ptr = row_ptr_in.contiguous();
    cols = cols_in.contiguous();
    values = values_in.to(at::kFloat).contiguous();
    sources = sources_in.contiguous();
    k2 = sources.size(1);
  }
};

// out (Q, G) float32 with the CSR over its N = Q + G items, and the optional per-query row scale.
struct JaccardArgs {
  int64_t Q, G, N;
  at::Tensor row_ptr, cols, values, scale;  // values / scale fp32; scale undefined when not given
  JaccardArgs(const at::Tensor& out, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
              const at::Tensor& values_in, const c10::optional<at::Tensor>& scale_in) {
    TORCH_CHECK_VALUE(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous(),
                      "kreciprocal: out must be a contiguous 2-D float32 tensor");
    Q = out.size(0);
    G = out.size(1);
    N = Q + G;
    check_csr(row_ptr_in, cols_in, N, N, &values_in);
    row_ptr = row_ptr_in.contiguous();
    cols = cols_in.contiguous();
    values = values_in.to(at::kFloat).contiguous();
    if (scale_in.has_value()) {
      scale = scale_in->to(at::kFloat).contiguous();
      TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) >= Q, "kreciprocal: row_scale must hold one value per query");
    }
  }
  const float* scale_or_null() const { return scale.defined() ? scale.const_data_ptr<float>() : nullptr; }
};

}  // namespace dpm_ops::kreciprocal
