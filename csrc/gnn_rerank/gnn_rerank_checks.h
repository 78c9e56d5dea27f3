// Argument checks shared by the CPU and CUDA entry points of the GNN re-ranking stages (the index and CSR
// checks: ../common/csr_checks.h), and their checked, contiguous arguments (the CUDA entry points
// check devices and set the device guard first).
#pragma once

#include <ATen/ATen.h>

#include "../common/csr_checks.h"

namespace dpm_ops::gnn_rerank {

constexpr const char* kOp = "gnn_rerank";

// A (N, N) as CSR, float32 values; sources (N, k2) item indices with their weights (N, k2).
struct PropagateArgs {
  at::Tensor row_ptr, cols, values, sources, weights;  // values / weights fp32
  int64_t N, k2;
  PropagateArgs(const at::Tensor& row_ptr_in, const at::Tensor& cols_in, const at::Tensor& values_in,
                const at::Tensor& sources_in, const at::Tensor& weights_in) {
    check_index_tensor(kOp, row_ptr_in, 1, "row_ptr");
    N = row_ptr_in.size(0) - 1;
    check_csr(kOp, row_ptr_in, cols_in, N, N, &values_in);
    check_index_tensor(kOp, sources_in, 2, "sources");
    TORCH_CHECK_VALUE(sources_in.size(0) == N, kOp, ": sources must have one row per item (", N, "), got ",
                      sources_in.sizes());
    TORCH_CHECK_VALUE(weights_in.sizes() == sources_in.sizes() && at::isFloatingType(weights_in.scalar_type()),
                      kOp, ": weights must be a floating tensor shaped like sources ", sources_in.sizes(), ", got ",
                      weights_in.sizes(), " ", weights_in.scalar_type());
    check_index_range(kOp, sources_in, N, "sources");
    row_ptr = row_ptr_in.contiguous();
    cols = cols_in.contiguous();
    values = values_in.to(at::kFloat).contiguous();
    sources = sources_in.contiguous();
    weights = weights_in.to(at::kFloat).contiguous();
    k2 = sources.size(1);
  }
};

// out (Q, G) float32 with the CSR over its N = Q + G items (queries first).
struct SimilarityArgs : QueryGalleryCsr {
  SimilarityArgs(const at::Tensor& out, const at::Tensor& row_ptr, const at::Tensor& cols, const at::Tensor& values)
      : QueryGalleryCsr(kOp, out, row_ptr, cols, values) {}
};

}  // namespace dpm_ops::gnn_rerank
