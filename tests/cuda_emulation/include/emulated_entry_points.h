// Included first in the emulator's build of the CUDA entry points (*_cuda.cpp): their kernels
// register as CPU kernels of dpm_ops_emulated::<op> (schemas defined by emulate.py from the ops'
// declarations), so that the tests call the CUDA code path on CPU tensors beside dpm_ops::<op>.
#pragma once

#include <torch/library.h>

#define DPM_OPS_KERNELS(dispatch_key, ...) \
  TORCH_LIBRARY_IMPL(dpm_ops_emulated, CPU, m) { ::dpm_ops::register_kernels(m, __VA_ARGS__); }
