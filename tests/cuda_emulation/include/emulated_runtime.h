// The CUDA runtime API of the emulator (emulated_cuda.h): the types and calls that host code uses,
// and nothing of the device side, so that the ATen entry points (*_cuda.cpp) can include it beside
// torch's headers.
#pragma once

#include <cstddef>

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x = 1, unsigned int y = 1, unsigned int z = 1) : x(x), y(y), z(z) {}
};
using uint3 = dim3;

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef cudaError_t cudaError;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

constexpr int kMaxDynamicShared = 232448;  // sm_90's opt-in limit (227 KB)

inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                                                            : "invalid argument";
}
