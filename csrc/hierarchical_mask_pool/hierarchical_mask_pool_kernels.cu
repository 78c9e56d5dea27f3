// CUDA kernels of the hierarchical masked pooling. No torch headers: see hierarchical_mask_pool_cuda.h.
// One warp per row (level, b, c); the LevelPack travels as a kernel argument.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "hierarchical_mask_pool_cuda.h"

namespace dpm_ops::hierarchical_mask_pool::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename A> __device__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A> __device__ A warp_max(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = max_update(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One block per (b, level): the level's resized mask cells and their sum.
template <typename T, typename A>
__global__ void resize_mask_kernel(const T* __restrict__ mask, int64_t H, int64_t W, LevelPack p,
                                   A* __restrict__ weights, A* __restrict__ sums) {
  const int64_t b = blockIdx.x / p.count;
  const LevelDesc& d = p.level[blockIdx.x % p.count];
  const T* plane = mask + b * H * W;
  const int64_t cells = d.height * d.width;
  RowSum sum = 0;
  for (int64_t i = threadIdx.x; i < cells; i += blockDim.x) {
    const A v = area_weight<A>([&](int64_t k) { return to_acc<A>(plane[k]); }, H, W, d.height, d.width,
                               i / d.width, i % d.width);
    weights[b * p.total_hw + d.weight_offset + i] = v;
    sum += v;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) sums[blockIdx.x] = static_cast<A>(sum);
}

struct RowView {
  int level;
  int64_t b, offset, hw, out_index;
};

__device__ RowView locate(const LevelPack& p, int64_t r) {
  const int l = find_level(p.level, p.count, r);
  const LevelDesc& d = p.level[l];
  const int64_t local = r - d.row_begin, b = local / d.channels;
  const int64_t hw = d.height * d.width;
  return {l, b, local * hw, hw, b * p.total_channels + d.out_offset + local % d.channels};
}

template <typename T, typename A, bool kMax, bool kBackward>
__global__ void __launch_bounds__(kThreads)
pool_kernel(LevelPack p, const A* __restrict__ weights, const A* __restrict__ sums, const T* __restrict__ grad,
            T* __restrict__ out) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.total_rows) return;  // whole warps leave together
  const RowView row = locate(p, r);
  const LevelDesc& d = p.level[row.level];
  const T* x = static_cast<const T*>(d.data) + row.offset;
  const A* w = weights ? weights + row.b * p.total_hw + d.weight_offset : nullptr;
  auto weight = [&](int64_t i) { return w ? w[i] : A(1); };
  const A total = sums ? sums[row.b * p.count + row.level] : A(row.hw);
  if (!kBackward) {
    A v;
    if (kMax) {
      A best = -INFINITY;
      for (int64_t i = lane; i < row.hw; i += 32)
        if (selected(weight(i))) best = max_update(best, to_acc<A>(x[i]));
      best = warp_max(best);
      v = total > A(0) ? best : A(0);  // total > 0 iff some cell is selected (weights are >= 0)
    } else {
      RowSum sum = 0;
      for (int64_t i = lane; i < row.hw; i += 32) sum += RowSum(weight(i)) * RowSum(to_acc<A>(x[i]));
      v = static_cast<A>(safe_divide(warp_sum(sum), RowSum(total)));
    }
    if (lane == 0) out[row.out_index] = from_acc<T>(v);
  } else {
    T* gx = static_cast<T*>(d.grad) + row.offset;
    const A g = to_acc<A>(grad[row.out_index]);
    if (kMax) {
      const A o = to_acc<A>(out[row.out_index]);
      int64_t ties = 0;
      for (int64_t i = lane; i < row.hw; i += 32) ties += selected(weight(i)) && to_acc<A>(x[i]) == o;
      ties = warp_sum(ties);
      for (int64_t i = lane; i < row.hw; i += 32) gx[i] = from_acc<T>(max_grad(g, to_acc<A>(x[i]), o, weight(i), ties));
    } else {
      for (int64_t i = lane; i < row.hw; i += 32) gx[i] = from_acc<T>(avg_grad(g, weight(i), total));
    }
  }
}

unsigned int row_blocks(const LevelPack& p) { return static_cast<unsigned int>((p.total_rows + kWarps - 1) / kWarps); }

template <bool kBackward>
void launch_pool(Dtype dtype, const LevelPack& p, const void* weights, const void* sums, const void* grad,
                 const void* out, bool max_mode, cudaStream_t stream) {
  if (p.total_rows == 0) return;
  launch_typed(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto kernel = max_mode ? pool_kernel<T, A, true, kBackward> : pool_kernel<T, A, false, kBackward>;
    kernel<<<row_blocks(p), kThreads, 0, stream>>>(p, typed<A>(weights), typed<A>(sums), typed<T>(grad),
                                                   const_cast<T*>(typed<T>(out)));
  });
}

}  // namespace

void resize_mask(Dtype dtype, const void* mask, int64_t H, int64_t W, const LevelPack& pack, void* weights,
                 void* sums, cudaStream_t stream) {
  if (pack.batch == 0) return;
  launch_typed(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    resize_mask_kernel<T, A><<<static_cast<unsigned int>(pack.batch * pack.count), kThreads, 0, stream>>>(
        typed<T>(mask), H, W, pack, typed<A>(weights), typed<A>(sums));
  });
}

void pool_forward(Dtype dtype, const LevelPack& pack, const void* weights, const void* sums, bool max_mode,
                  void* out, cudaStream_t stream) {
  launch_pool<false>(dtype, pack, weights, sums, nullptr, out, max_mode, stream);
}

void pool_backward(Dtype dtype, const LevelPack& pack, const void* grad, const void* weights, const void* sums,
                   const void* out, bool max_mode, cudaStream_t stream) {
  launch_pool<true>(dtype, pack, weights, sums, grad, out, max_mode, stream);
}

}  // namespace dpm_ops::hierarchical_mask_pool::cuda
