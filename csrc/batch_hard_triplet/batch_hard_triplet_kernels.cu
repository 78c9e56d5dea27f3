// CUDA kernels of the batch-hard soft-margin triplet. No torch headers: see batch_hard_triplet_cuda.h.
#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "batch_hard_triplet_cuda.h"
#include "batch_hard_triplet_math.h"

namespace dpm_ops::batch_hard_triplet::cuda {
namespace {

constexpr int kThreads = 256;

template <typename A> struct Pick {
  A value;
  int64_t index;  // -1: none
  A d2;           // the squared distance behind `value` (for the live flag)
};

// The block's extreme (max when kMax, else min), first index on ties; every thread gets it.
template <bool kMax, typename A> __device__ Pick<A> block_pick(Pick<A> v) {
  __shared__ A values[32], d2s[32];
  __shared__ int64_t indices[32];
  auto better = [](Pick<A> a, Pick<A> b) {  // b replaces a?
    if (b.index < 0) return false;
    if (a.index < 0) return true;
    const bool harder = kMax ? harder_positive(b.value, a.value) : harder_negative(b.value, a.value);
    return harder || (b.value == a.value && b.index < a.index);
  };
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Pick<A> other{__shfl_down_sync(0xffffffffu, v.value, offset), __shfl_down_sync(0xffffffffu, v.index, offset),
                        __shfl_down_sync(0xffffffffu, v.d2, offset)};
    if (better(v, other)) v = other;
  }
  if (lane == 0) {
    values[warp] = v.value;
    indices[warp] = v.index;
    d2s[warp] = v.d2;
  }
  __syncthreads();
  Pick<A> total{A(0), -1, A(0)};
  for (int w = 0; w < int(blockDim.x + 31) / 32; ++w)
    if (better(total, Pick<A>{values[w], indices[w], d2s[w]})) total = Pick<A>{values[w], indices[w], d2s[w]};
  __syncthreads();
  return total;
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
mine_kernel(const A* __restrict__ sq, const A* __restrict__ gram, const int64_t* __restrict__ labels, int64_t B,
            int64_t* __restrict__ pos_index, int64_t* __restrict__ neg_index, A* __restrict__ pos_dist,
            A* __restrict__ neg_dist, uint8_t* __restrict__ live, A* __restrict__ row_loss) {
  const int64_t i = blockIdx.x;
  Pick<A> pos{A(0), -1, A(0)}, neg{A(0), -1, A(0)};
  for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
    const A d2 = squared_distance(sq[i], sq[j], gram[i * B + j]);
    const A d = distance(d2);
    const bool same = labels[j] == labels[i];
    Pick<A>& best = same ? pos : neg;
    const bool take = best.index < 0 || (same ? harder_positive(d, best.value) : harder_negative(d, best.value));
    if (take) best = Pick<A>{d, j, d2};  // j grows within a thread: strict comparison keeps the first index
  }
  pos = block_pick<true>(pos);
  neg = block_pick<false>(neg);
  if (threadIdx.x == 0) {
    const A ap = pos.value, an = neg.index >= 0 ? neg.value : A(INFINITY);
    pos_index[i] = pos.index;
    neg_index[i] = neg.index;
    pos_dist[i] = ap;
    neg_dist[i] = an;
    live[2 * i] = distance_is_live(pos.d2);
    live[2 * i + 1] = neg.index >= 0 && distance_is_live(neg.d2);
    row_loss[i] = softplus(ap - an);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
gradient_kernel(const A* __restrict__ x, const int64_t* __restrict__ pos_index, const int64_t* __restrict__ neg_index,
                const A* __restrict__ pos_dist, const A* __restrict__ neg_dist, const uint8_t* __restrict__ live,
                int64_t B, int64_t C, A* __restrict__ grad) {
  const int64_t j = blockIdx.x;
  auto coef = [&](int64_t i, bool positive) {
    const A c = softplus_slope(pos_dist[i] - neg_dist[i]) / A(B);
    return positive ? pair_coefficient(c, pos_dist[i], live[2 * i] != 0)
                    : pair_coefficient(-c, neg_dist[i], live[2 * i + 1] != 0);
  };
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A xj = x[j * C + c];
    A g = A(0);
    if (pos_index[j] != j) g += coef(j, true) * (xj - x[pos_index[j] * C + c]);
    if (neg_index[j] >= 0) g += coef(j, false) * (xj - x[neg_index[j] * C + c]);
    for (int64_t i = 0; i < B; ++i) {
      if (i == j) continue;
      if (pos_index[i] == j) g += coef(i, true) * (xj - x[i * C + c]);
      if (neg_index[i] == j) g += coef(i, false) * (xj - x[i * C + c]);
    }
    grad[j * C + c] = g;
  }
}

}  // namespace

void mine(Dtype dtype, const void* sq, const void* gram, const int64_t* labels, int64_t B, int64_t* pos_index,
          int64_t* neg_index, void* pos_dist, void* neg_dist, uint8_t* live, void* row_loss, cudaStream_t stream) {
  if (B == 0) return;
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    mine_kernel<A><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
        typed<A>(sq), typed<A>(gram), labels, B, pos_index, neg_index,
        typed<A>(pos_dist), typed<A>(neg_dist), live, typed<A>(row_loss));
  });
}

void gradient(Dtype dtype, const void* x, const int64_t* pos_index, const int64_t* neg_index, const void* pos_dist,
              const void* neg_dist, const uint8_t* live, int64_t B, int64_t C, void* grad, cudaStream_t stream) {
  if (B == 0 || C == 0) return;
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    gradient_kernel<A><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
        typed<A>(x), pos_index, neg_index, typed<A>(pos_dist),
        typed<A>(neg_dist), live, B, C, typed<A>(grad));
  });
}

}  // namespace dpm_ops::batch_hard_triplet::cuda
