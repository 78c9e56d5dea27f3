// Kernel registration of the entry points (csrc/<op>/<op>_{cpu,cuda}.cpp): the op schemas are
// declared once in Python (dpm_ops/ops/_declare.py), so a device file only adds its kernels to them:
//
//   DPM_OPS_KERNELS(CPU,
//                   "hem_loss", &hem_loss_cpu,
//                   "hem_loss_backward", &hem_loss_backward_cpu)
#pragma once

#include <torch/library.h>

namespace dpm_ops {

inline void register_kernels(torch::Library&) {}

// Registers each (op name, kernel function) pair in turn.
template <typename Fn, typename... Rest>
void register_kernels(torch::Library& m, const char* op, Fn* kernel, Rest... rest) {
  m.impl(op, kernel);
  register_kernels(m, rest...);
}

}  // namespace dpm_ops

// Registers the (op name, &kernel) pairs that follow `dispatch_key` (CPU, CUDA) into the dpm_ops
// library. Used at namespace scope, without a trailing semicolon, like TORCH_LIBRARY_IMPL. (The
// tests' CUDA emulator defines it first, to build the CUDA entry points into a library of its own:
// tests/cuda_emulation.)
#ifndef DPM_OPS_KERNELS
#define DPM_OPS_KERNELS(dispatch_key, ...) \
  TORCH_LIBRARY_IMPL(dpm_ops, dispatch_key, m) { ::dpm_ops::register_kernels(m, __VA_ARGS__); }
#endif
