// The emulator's stand-in for c10's CUDA device guard: the emulated kernels run on CPU tensors.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};

}  // namespace c10::cuda
