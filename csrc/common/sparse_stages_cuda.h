// ATen-side helpers of the sparse re-ranking stages' CUDA entry points (kreciprocal_cuda.cpp,
// gnn_rerank_cuda.cpp): their device check, and the two passes of a ragged output (the count pass's
// row_ptr, the row kernels' per-thread scratch).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace dpm_ops {

// `t` (argument `name` of `op`) must be on `like`'s device.
inline void check_device(const char* op, const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

// row_ptr (rows + 1) = [0, cumsum(sizes)], the exclusive scan of the count pass.
inline at::Tensor row_pointers(const at::Tensor& sizes) {
  return at::cat({at::zeros({1}, sizes.options()), at::cumsum(sizes, 0)});
}

// int64 scratch of `threads` threads (the launcher's scratch_threads(rows)) with `slots_per_thread` each.
inline at::Tensor scratch_for(int64_t threads, int64_t slots_per_thread, const at::TensorOptions& options) {
  return at::empty({threads * std::max<int64_t>(slots_per_thread, 1)}, options.dtype(at::kLong));
}

}  // namespace dpm_ops
