// C entry points of the emulated launchers (emulate.py loads them with ctypes): each runs one
// torch-free launcher of csrc/ and returns 0, or 1 with its error in last_error().
#include <cuda_runtime.h>

#include <climits>
#include <exception>
#include <string>
#include <vector>

#include "knn/knn_certified_cuda.h"
#include "knn/knn_cuda.h"

namespace {

std::string error;

template <typename F> int guarded(F run) {
  try {
    run();
    return 0;
  } catch (const std::exception& e) {
    error = e.what();
    return 1;
  }
}

dpm_ops::Dtype dtype(int d) { return static_cast<dpm_ops::Dtype>(d); }

// The emulator's own check: lane 0 waits at its warp's barrier while the rest of the block waits
// at the block's, so neither barrier completes.
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) __syncwarp();
  else __syncthreads();
}

// memcheck.sh's own checks: each thread writes the float after its own, so the last thread writes one
// past the end of global memory (where 0), of a static shared array (1) or of the dynamic shared memory
// (2).
__global__ void out_of_bounds_kernel(float* global, int where) {
  __shared__ float block_shared[64];
  extern __shared__ __align__(16) unsigned char launch_shared[];
  float* memory[] = {global, block_shared, reinterpret_cast<float*>(launch_shared)};
  memory[where][threadIdx.x + 1] = 1.0f;
}

// And an index that overflows int past thread 1 of the block.
__global__ void signed_overflow_kernel(int* out) { out[threadIdx.x] = INT_MAX - 1 + int(threadIdx.x); }

}  // namespace

extern "C" {

const char* last_error() { return error.c_str(); }

void set_schedule(int order) { emu::schedule() = static_cast<emu::Schedule>(order); }

int deadlock() {
  return guarded([] { deadlock_kernel<<<2, 64>>>(); });
}

int out_of_bounds(int where) {
  return guarded([&] {
    std::vector<float> global(64);
    out_of_bounds_kernel<<<1, 64, 64 * sizeof(float)>>>(global.data(), where);
  });
}

int signed_overflow() {
  return guarded([] {
    std::vector<int> out(32);
    signed_overflow_kernel<<<1, 32>>>(out.data());
  });
}

int knn_select(int d, const void* dots, const void* x_norms, const void* y_norms, int64_t rows, int64_t row0, int64_t N,
               int64_t k, int metric, bool self, void* out_values, int64_t* out_indices, void* row_max, void* cross,
               int64_t cross_rows) {
  return guarded([&] {
    dpm_ops::knn::cuda::select(dtype(d), dots, x_norms, y_norms, rows, row0, N, k, metric, self, out_values,
                               out_indices, row_max, cross, cross_rows, nullptr);
  });
}

int knn_certified_candidates(int d, const float* dots, const float* x_scales, const float* y_scales,
                             const void* x_norms, const void* y_norms, int64_t rows, int64_t row0, int64_t N,
                             int64_t k, int64_t cap, int metric, bool self, int32_t* near, int32_t* near_count,
                             int32_t* far, int32_t* far_count) {
  return guarded([&] {
    dpm_ops::knn::cuda::certified_candidates(dtype(d), dots, x_scales, y_scales, x_norms, y_norms, rows, row0, N, k,
                                             cap, metric, self, near, near_count, far, far_count, nullptr);
  });
}

int knn_certified_candidate_distances(int d, const void* x, const void* y, const void* x_norms, const void* y_norms,
                                      const int64_t* rows, const int64_t* candidates, const int64_t* counts,
                                      int64_t R, int64_t C, int64_t D, int metric, bool self, void* out) {
  return guarded([&] {
    dpm_ops::knn::cuda::candidate_distances(dtype(d), x, y, x_norms, y_norms, rows, candidates, counts, R, C, D,
                                            metric, self, out, nullptr);
  });
}

}  // extern "C"
