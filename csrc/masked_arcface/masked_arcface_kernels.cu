// CUDA row passes of the fused masked ArcFace cross-entropy. No torch headers: see masked_arcface_cuda.h.
#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "masked_arcface_cuda.h"
#include "masked_arcface_math.h"

namespace dpm_ops::masked_arcface::cuda {
namespace {

using masked_cosine::backward_coef;
using masked_cosine::cosine;

constexpr int kThreads = 256;
constexpr double kEps = 1e-12;

// Merge of the block's running log-sum-exps; every thread gets the total.
template <typename A> __device__ Lse<A> block_lse(Lse<A> v) {
  __shared__ A maxes[32], sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Lse<A> other{__shfl_down_sync(0xffffffffu, v.max, offset), __shfl_down_sync(0xffffffffu, v.sum, offset)};
    v = lse_merge(v, other);
  }
  if (lane == 0) {
    maxes[warp] = v.max;
    sums[warp] = v.sum;
  }
  __syncthreads();
  Lse<A> total = lse_empty<A>();
  for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) total = lse_merge(total, Lse<A>{maxes[w], sums[w]});
  __syncthreads();
  return total;
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
masked_rows_kernel(A* __restrict__ num, A* __restrict__ den_sq, const int64_t* __restrict__ labels, int64_t K,
                   Margin<A> m, A masked_weight, A g, bool with_grad, A* __restrict__ row_loss) {
  const int64_t r = blockIdx.x;
  const int64_t y = labels[r];
  A* nr = num + r * K;
  A* dr = den_sq + r * K;
  Lse<A> acc = lse_empty<A>();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    acc = lse_add(acc, arc_logit(cosine(nr[k], dr[k], A(kEps)), k == y, m));
  const A lse = lse_value(block_lse(acc));
  const bool valid = y >= 0 && y < K;
  if (threadIdx.x == 0)
    row_loss[r] = valid ? masked_weight * (lse - arc_logit(cosine(nr[y], dr[y], A(kEps)), true, m)) : A(NAN);
  __syncthreads();  // the target's num / den² are read above before any thread overwrites them
  if (!with_grad || !valid) return;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const A c = cosine(nr[k], dr[k], A(kEps));
    const A prob = exp_of(arc_logit(c, k == y, m) - lse);
    const auto coef = backward_coef(grad_cosine(c, k == y, prob, g, m), c, dr[k], A(kEps));
    nr[k] = coef.g_num;
    dr[k] = coef.h;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
plain_rows_kernel(A* __restrict__ plain, const int64_t* __restrict__ labels, int64_t K, A plain_weight, A g,
                  bool with_grad, A* __restrict__ row_loss) {
  const int64_t r = blockIdx.x;
  const int64_t y = labels[r];
  A* pr = plain + r * K;
  Lse<A> acc = lse_empty<A>();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) acc = lse_add(acc, pr[k]);
  const A lse = lse_value(block_lse(acc));
  const bool valid = y >= 0 && y < K;
  if (threadIdx.x == 0 && valid) row_loss[r] += plain_weight * (lse - pr[y]);
  __syncthreads();
  if (!with_grad || !valid) return;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) pr[k] = grad_plain(exp_of(pr[k] - lse), k == y, g);
}

}  // namespace

void masked_rows(Dtype dtype, void* num, void* den_sq, const int64_t* labels, int64_t rows, int64_t K, int64_t batch,
                 bool with_grad, LossParams p, void* row_loss, cudaStream_t stream) {
  if (rows == 0) return;
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    masked_rows_kernel<A><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        typed<A>(num), typed<A>(den_sq), labels, K,
        make_margin<A>(p.scale, p.margin, p.easy_margin, p.clamp_eps), A(p.masked_weight),
        A(p.masked_weight) / A(batch), with_grad, typed<A>(row_loss));
  });
}

void plain_rows(Dtype dtype, void* plain, const int64_t* labels, int64_t rows, int64_t K, int64_t batch,
                bool with_grad, LossParams p, void* row_loss, cudaStream_t stream) {
  if (rows == 0) return;
  launch_computed(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    plain_rows_kernel<A><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        typed<A>(plain), labels, K, A(p.plain_weight), A(p.plain_weight) / A(batch), with_grad,
        typed<A>(row_loss));
  });
}

}  // namespace dpm_ops::masked_arcface::cuda
