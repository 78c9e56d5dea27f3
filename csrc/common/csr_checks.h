// Argument checks of the ops that take index tensors and CSR matrices (the sparse re-ranking stages).
// The ops are reachable from Python (torch.ops.dpm_ops.*), so every index a kernel follows is
// range-checked once per call, before any kernel reads through it: O(size) ATen reductions on the
// tensor's own device (one small copy to the host each), negligible next to the stages. `op` names
// the op in the messages.
#pragma once

#include <ATen/ATen.h>

namespace dpm_ops {

inline void check_index_tensor(const char* op, const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim && t.scalar_type() == at::kLong, op, ": ", name, " must be a ", dim,
                    "-D int64 tensor, got ", t.sizes(), " ", t.scalar_type());
}

// Every entry of `index` lies in [0, limit).
inline void check_index_range(const char* op, const at::Tensor& index, int64_t limit, const char* name) {
  if (index.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(index);
  const at::Tensor bounds = at::stack({lo, hi}).cpu();
  const int64_t low = bounds[0].item<int64_t>(), high = bounds[1].item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high < limit, op, ": ", name, " must hold indices in [0, ", limit,
                    "), got values in [", low, ", ", high, "]");
}

// (N, width) neighbour lists of N items: int64 item indices.
inline void check_neighbours(const char* op, const at::Tensor& neighbours, const char* name = "neighbours") {
  check_index_tensor(op, neighbours, 2, name);
  check_index_range(op, neighbours, neighbours.size(0), name);
}

// A CSR of `rows` rows over columns [0, num_cols): row_ptr (rows + 1) starts at 0, never decreases
// and ends at cols.size(0); `values`, when given, has one entry per column entry.
inline void check_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& cols, int64_t rows, int64_t num_cols,
                      const at::Tensor* values = nullptr) {
  check_index_tensor(op, row_ptr, 1, "row_ptr");
  check_index_tensor(op, cols, 1, "cols");
  TORCH_CHECK_VALUE(row_ptr.size(0) == rows + 1, op, ": row_ptr must have ", rows + 1, " entries, got ",
                    row_ptr.size(0));
  if (values != nullptr)
    TORCH_CHECK_VALUE(values->dim() == 1 && values->size(0) == cols.size(0), op, ": values must be 1-D with ",
                      cols.size(0), " entries like cols, got ", values->sizes());
  const at::Tensor steps = rows > 0 ? row_ptr.diff().min() : at::zeros({}, row_ptr.options());
  const at::Tensor ends = at::stack({row_ptr[0], row_ptr[rows], steps}).cpu();
  TORCH_CHECK_VALUE(ends[0].item<int64_t>() == 0 && ends[1].item<int64_t>() == cols.size(0) &&
                        ends[2].item<int64_t>() >= 0,
                    op, ": row_ptr must start at 0, never decrease and end at cols.size(0) = ", cols.size(0));
  check_index_range(op, cols, num_cols, "cols");
}

// The arguments of a query x gallery stage: out (Q, G) float32, contiguous, and a CSR over its N = Q + G
// items (queries first), checked; the CSR contiguous, its values float32.
struct QueryGalleryCsr {
  int64_t Q, G, N;
  at::Tensor row_ptr, cols, values;
  QueryGalleryCsr(const char* op, const at::Tensor& out, const at::Tensor& row_ptr_in, const at::Tensor& cols_in,
                  const at::Tensor& values_in) {
    TORCH_CHECK_VALUE(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous(), op,
                      ": out must be a contiguous 2-D float32 tensor");
    Q = out.size(0);
    G = out.size(1);
    N = Q + G;
    check_csr(op, row_ptr_in, cols_in, N, N, &values_in);
    row_ptr = row_ptr_in.contiguous();
    cols = cols_in.contiguous();
    values = values_in.to(at::kFloat).contiguous();
  }
};

}  // namespace dpm_ops
