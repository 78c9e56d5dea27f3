// CUDA kernels of MaskReID's ranking loss. No torch headers: see maskreid_ranking_loss_cuda.h.
// The per-row maths is maskreid_ranking_loss_math.h's, run by one warp per row (WarpReduce).
#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "../common/warp_reduce.cuh"
#include "maskreid_ranking_loss_cuda.h"
#include "maskreid_ranking_loss_math.h"

namespace dpm_ops::maskreid_ranking::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = 32 * kWarpsPerBlock;

// The row a warp owns; the whole warp leaves together when it owns none (shuffles stay full).
__device__ __forceinline__ int64_t warp_row() { return int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; }

__global__ void positives_kernel(const int64_t* __restrict__ labels, int64_t n, int64_t* __restrict__ num_pos) {
  const int64_t k = warp_row();
  if (k >= n) return;
  const int lane = threadIdx.x % 32;
  const int64_t count = num_positives(labels, k, n, lane, 32, WarpReduce());
  if (lane == 0) num_pos[k] = count;
}

template <typename A>
__global__ void rows_kernel(const A* __restrict__ sim, const int64_t* __restrict__ labels,
                            const int64_t* __restrict__ num_pos, int64_t n, Options<A> o, A* __restrict__ row_losses,
                            A* __restrict__ coef) {
  const int64_t k = warp_row();
  if (k >= n) return;
  const int lane = threadIdx.x % 32;
  const WarpReduce warp;
  int64_t anchors = 0;  // every warp counts them (n reads): no grid-wide step before the rows
  for (int64_t i = lane; i < n; i += 32) anchors += num_pos[i] > 0;
  anchors = warp.sum(anchors);
  const A scale = A(1) / A(anchors > 0 ? anchors : 1);
  const A loss = row_loss(sim + k * n, labels, k, n, o, scale, lane, 32, warp, coef + k * n);
  if (lane == 0) row_losses[k] = loss;
}

// coef = G + Gᵀ in place; each (k < j) pair is visited by one thread. G's diagonal is 0.
template <typename A> __global__ void symmetrize_kernel(A* __restrict__ coef, int64_t n) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n * n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = e / n, j = e % n;
    if (j <= k) continue;
    const A v = coef[k * n + j] + coef[j * n + k];
    coef[k * n + j] = v;
    coef[j * n + k] = v;
  }
}

unsigned int blocks_for(int64_t n, int per_block) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

}  // namespace

void forward(Dtype acc, const void* sim, const int64_t* labels, int64_t n, const Options<double>& options,
             int64_t* num_pos, void* row_losses, void* coef, void* loss, cudaStream_t stream) {
  launch_computed(acc, [&](auto tag) {
    using A = typename decltype(tag)::type;
    A* loss_out = typed<A>(loss);
    if (n > 0) {
      const unsigned int row_blocks = static_cast<unsigned int>((n + kWarpsPerBlock - 1) / kWarpsPerBlock);
      positives_kernel<<<row_blocks, kThreads, 0, stream>>>(labels, n, num_pos);
      const Options<A> o = cast<A>(options);
      rows_kernel<A><<<row_blocks, kThreads, 0, stream>>>(typed<A>(sim), labels, num_pos, n, o,
                                                          typed<A>(row_losses), typed<A>(coef));
      symmetrize_kernel<A><<<blocks_for(n * n, 256), 256, 0, stream>>>(typed<A>(coef), n);
    }
    scaled_sum_kernel<A><<<1, 256, 0, stream>>>(typed<A>(row_losses), n, A(1), loss_out);
  });
}

}  // namespace dpm_ops::maskreid_ranking::cuda
