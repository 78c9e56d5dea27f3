// Row selection on the GPU: a thread block selects one row's k smallest (value, index) pairs. Each
// of its kWarps warps scans an interleaved share of the row's columns into its own sorted list, as
// in faiss's WarpSelect (a lane's value enters only if it beats the list's current k-th pair: one
// ballot per 32 columns; each entering value is inserted by the whole warp at once); warp 0 then
// merges the other warps' lists into its own the same way. Shared by the knn selection kernel
// (knn_kernels.cu) and the certified search's stage 1 (knn_certified_kernels.cu). No torch headers.
// k <= 32: a list lives in registers, lane l holding the l-th smallest pair; an insertion at p is
// one ballot (p = number of smaller pairs) and one shuffle up. k > 32: the lists live in shared
// memory (RowSelect::shared_bytes) and each warp shifts its own cooperatively.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <string>

#include "../common/launch.cuh"
#include "knn_math.h"

namespace dpm_ops::knn::cuda {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kNoIndex = INT64_MAX;
constexpr int kMaxRegisterK = 32;

template <typename A> __device__ __forceinline__ A infinity();
template <> __device__ __forceinline__ float infinity<float>() { return FLT_MAX * 2.f; }
template <> __device__ __forceinline__ double infinity<double>() { return DBL_MAX * 2.0; }

// Register list (k <= 32): lane l holds the l-th smallest pair of its warp's share of the row.
template <typename A> struct WarpList {
  A value;
  int64_t index;

  __device__ void reset() {
    value = infinity<A>();
    index = kNoIndex;
  }
  // The k-th smallest pair, on every lane.
  __device__ void kth(int k, A& v, int64_t& i) const {
    v = __shfl_sync(kFull, value, k - 1);
    i = __shfl_sync(kFull, index, k - 1);
  }
  // Inserts (v, i) (the same on every lane), known to beat the k-th pair.
  __device__ __forceinline__ void insert(A v, int64_t i) {
    const int lane = threadIdx.x % 32;
    const int position = __popc(__ballot_sync(kFull, pair_less(value, index, v, i)));
    const A up_value = __shfl_up_sync(kFull, value, 1);
    const int64_t up_index = __shfl_up_sync(kFull, index, 1);
    if (lane == position) {
      value = v;
      index = i;
    } else if (lane > position) {
      value = up_value;
      index = up_index;
    }
  }
};

// Shared-memory list (any k <= kMaxSharedK), kept sorted by its warp.
template <typename A> struct SharedList {
  A* values;
  int64_t* indices;
  int k;

  __device__ void reset() {
    for (int p = threadIdx.x % 32; p < k; p += 32) {
      values[p] = infinity<A>();
      indices[p] = kNoIndex;
    }
    __syncwarp();
  }
  __device__ void kth(int, A& v, int64_t& i) const {
    v = values[k - 1];
    i = indices[k - 1];
  }
  __device__ __forceinline__ void insert(A v, int64_t i) {
    const int lane = threadIdx.x % 32;
    int position = 0;
    for (int base = 0; base < k; base += 32) {
      const int p = base + lane;
      position += __popc(__ballot_sync(kFull, p < k && pair_less(values[p], indices[p], v, i)));
    }
    // Shift [position, k - 1) up by one: read everything first, then write. (Unrolling this loop
    // makes ptxas spill the fp64 instantiation.)
#pragma unroll 1
    for (int base = k - 1; base > position; base -= 32) {
      const int p = base - lane;
      const bool moves = p > position;
      A moved_value = moves ? values[p - 1] : A(0);
      int64_t moved_index = moves ? indices[p - 1] : 0;
      __syncwarp();
      if (moves) {
        values[p] = moved_value;
        indices[p] = moved_index;
      }
      __syncwarp();
    }
    if (lane == 0) {
      values[position] = v;
      indices[position] = i;
    }
    __syncwarp();
  }
};

// Offers one pair per lane (where `valid`) to the warp's list: one ballot, then the entering pairs
// one at a time (re-checked against the k-th pair, which each insertion lowers).
template <typename A, typename List>
__device__ __forceinline__ void offer(List& list, int k, A v, int64_t i, bool valid) {
  A kth_v;
  int64_t kth_i;
  list.kth(k, kth_v, kth_i);
  unsigned pending = __ballot_sync(kFull, valid && pair_less(v, i, kth_v, kth_i));
  while (pending) {
    const int source = __ffs(pending) - 1;
    pending &= pending - 1;
    const A cv = __shfl_sync(kFull, v, source);
    const int64_t ci = __shfl_sync(kFull, i, source);
    list.kth(k, kth_v, kth_i);
    if (pair_less(cv, ci, kth_v, kth_i)) list.insert(cv, ci);
  }
}

// One thread block's selection of a row's k smallest pairs: offer_row() offers every column, each
// warp an interleaved share into its own list, then merge() leaves the row's list in warp 0.
// kRegisters: k <= kMaxRegisterK.
template <typename A, bool kRegisters> struct RowSelect {
  WarpList<A> registers;
  SharedList<A> shared;
  int k;

  // Bytes of dynamic shared memory the lists take (none in registers).
  static size_t shared_bytes(int64_t k) {
    return kRegisters ? 0 : size_t(kWarps) * size_t(k) * (sizeof(A) + sizeof(int64_t));
  }

  // `storage`: the kernel's dynamic shared memory (unused with kRegisters).
  __device__ RowSelect(int k, unsigned char* storage) : k(k) {
    if constexpr (kRegisters) {
      registers.reset();
    } else {
      const int warp = threadIdx.x / 32;
      A* values = reinterpret_cast<A*>(storage);
      int64_t* indices = reinterpret_cast<int64_t*>(storage + sizeof(A) * kWarps * k);
      shared = SharedList<A>{values + warp * k, indices + warp * k, k};
      shared.reset();
    }
  }

  __device__ __forceinline__ void offer(A v, int64_t i, bool valid) {
    if constexpr (kRegisters) cuda::offer(registers, k, v, i, valid);
    else cuda::offer(shared, k, v, i, valid);
  }

  // Offers (value_of(col), col) for every column col < N of the row, warp w taking the columns
  // w * 32 + lane + j * kThreads.
  template <class ValueOf> __device__ __forceinline__ void offer_row(int64_t N, ValueOf value_of) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int64_t base = int64_t(warp) * 32; base < N; base += kThreads) {
      const int64_t col = base + lane;
      offer(col < N ? value_of(col) : infinity<A>(), col, col < N);
    }
  }

  // Called by every thread once the row is offered: warp 0's list becomes the row's k smallest
  // pairs; the other warps return at once (a __syncthreads after this waits for warp 0).
  __device__ void merge() {
    __shared__ A stage_values[kWarps][32];  // k <= 32: the warps' lists, for warp 0's merge
    __shared__ int64_t stage_indices[kWarps][32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if constexpr (kRegisters) {
      stage_values[warp][lane] = registers.value;
      stage_indices[warp][lane] = registers.index;
    }
    __syncthreads();
    if (warp != 0) return;
    for (int w = 1; w < kWarps; ++w) {
      if constexpr (kRegisters) {
        cuda::offer(registers, k, stage_values[w][lane], stage_indices[w][lane], lane < k);
      } else {
        const A* values = shared.values + (w * k);
        const int64_t* indices = shared.indices + (w * k);
        for (int base = 0; base < k; base += 32) {
          const int p = base + lane;
          cuda::offer(shared, k, p < k ? values[p] : A(0), p < k ? indices[p] : kNoIndex, p < k);
        }
      }
    }
  }

  // After merge(), in warp 0: the row's k-th smallest pair, on every lane.
  __device__ void kth(A& v, int64_t& i) const {
    if constexpr (kRegisters) registers.kth(k, v, i);
    else shared.kth(k, v, i);
  }

  // After merge(), in warp 0: the row's k smallest pairs, sorted, into values[0, k) / indices[0, k).
  __device__ void store(A* values, int64_t* indices) const {
    const int lane = threadIdx.x % 32;
    if constexpr (kRegisters) {
      if (lane < k) {
        values[lane] = registers.value;
        indices[lane] = registers.index;
      }
    } else {
      for (int p = lane; p < k; p += 32) {
        values[p] = shared.values[p];
        indices[p] = shared.indices[p];
      }
    }
  }
};

template <typename T> struct Exactly {
  using type = T;
};

// Launches kernel<A, true> (registers) for k <= kMaxRegisterK, else kernel<A, false> with its
// lists in dynamic shared memory: one thread block of kThreads per row. `kernel` names its use in
// errors.
template <typename A, typename... Args>
void launch_row_select(void (*in_registers)(Args...), void (*in_shared)(Args...), int64_t k, int64_t rows,
                       cudaStream_t stream, const char* kernel, typename Exactly<Args>::type... args) {
  const unsigned int blocks = static_cast<unsigned int>(rows);
  if (k <= kMaxRegisterK) {
    in_registers<<<blocks, kThreads, 0, stream>>>(args...);
    return;
  }
  const size_t bytes = RowSelect<A, false>::shared_bytes(k);
  check_cuda(cudaFuncSetAttribute(in_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
             std::string(kernel) + ": cudaFuncSetAttribute(MaxDynamicSharedMemorySize = " + std::to_string(bytes) +
                 " bytes)");
  in_shared<<<blocks, kThreads, bytes, stream>>>(args...);
}

}  // namespace dpm_ops::knn::cuda
