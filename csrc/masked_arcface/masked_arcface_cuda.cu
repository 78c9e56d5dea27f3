// CUDA row passes of the fused masked ArcFace cross-entropy. No torch headers: see masked_arcface_cuda.h.
#include "../common/cuda_utils.cuh"
#include "masked_arcface_cuda.h"
#include "masked_arcface_math.h"

namespace dpm_ops {
namespace masked_arcface {
namespace cuda {
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
forward_rows_kernel(const A* __restrict__ num, const A* __restrict__ den_sq, const A* __restrict__ plain,
                    const int64_t* __restrict__ labels, int64_t K, Margin<A> m, A plain_weight, A masked_weight,
                    A* __restrict__ masked_lse, A* __restrict__ plain_lse, A* __restrict__ row_loss) {
  const int64_t r = blockIdx.x;
  const int64_t y = labels[r];
  const A* nr = num + r * K;
  const A* dr = den_sq + r * K;
  Lse<A> acc = lse_empty<A>(), pacc = lse_empty<A>();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    acc = lse_add(acc, arc_logit(cosine(nr[k], dr[k], A(kEps)), k == y, m));
    if (plain) pacc = lse_add(pacc, plain[r * K + k]);
  }
  const A lse = lse_value(block_lse(acc));
  const A plse = plain ? lse_value(block_lse(pacc)) : A(0);
  if (threadIdx.x == 0) {
    if (y < 0 || y >= K) {
      masked_lse[r] = row_loss[r] = A(NAN);
      return;
    }
    masked_lse[r] = lse;
    A value = masked_weight * (lse - arc_logit(cosine(nr[y], dr[y], A(kEps)), true, m));
    if (plain) {
      plain_lse[r] = plse;
      value += plain_weight * (plse - plain[r * K + y]);
    }
    row_loss[r] = value;
  }
}

template <typename A>
__global__ void backward_rows_kernel(const A* __restrict__ grad, A* __restrict__ num, A* __restrict__ den_sq,
                                     A* __restrict__ plain, const int64_t* __restrict__ labels,
                                     const A* __restrict__ masked_lse, const A* __restrict__ plain_lse, int64_t n,
                                     int64_t K, A inv_batch, Margin<A> m, A plain_weight, A masked_weight) {
  const A g = grad[0] * inv_batch;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / K, k = i % K;
    const bool is_target = labels[r] == k;
    const A c = cosine(num[i], den_sq[i], A(kEps));
    const A prob = exp_of(arc_logit(c, is_target, m) - masked_lse[r]);
    const auto coef = backward_coef(grad_cosine(c, is_target, prob, g * masked_weight, m), c, den_sq[i], A(kEps));
    num[i] = coef.g_num;
    den_sq[i] = coef.h;
    if (plain) plain[i] = grad_plain(exp_of(plain[i] - plain_lse[r]), is_target, g * plain_weight);
  }
}

template <typename F> void dispatch_float(Dtype dtype, F&& f) {
  if (dtype == Dtype::kDouble) f(TypeTag<double>{});
  else f(TypeTag<float>{});  // the adapters pass fp32 or fp64 only
}

unsigned int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

}  // namespace

void forward_rows(Dtype dtype, const void* num, const void* den_sq, const void* plain, const int64_t* labels,
                  int64_t rows, int64_t K, LossParams p, void* masked_lse, void* plain_lse, void* row_loss,
                  cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_float(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    forward_rows_kernel<A><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
        static_cast<const A*>(num), static_cast<const A*>(den_sq), static_cast<const A*>(plain), labels, K,
        make_margin<A>(p.scale, p.margin, p.easy_margin, p.clamp_eps), A(p.plain_weight), A(p.masked_weight),
        static_cast<A*>(masked_lse), static_cast<A*>(plain_lse), static_cast<A*>(row_loss));
  });
  DPM_CUDA_CHECK_LAUNCH();
}

void backward_rows(Dtype dtype, const void* grad, void* num, void* den_sq, void* plain, const int64_t* labels,
                   const void* masked_lse, const void* plain_lse, int64_t rows, int64_t K, int64_t batch,
                   LossParams p, cudaStream_t stream) {
  const int64_t n = rows * K;
  if (n == 0) return;
  dispatch_float(dtype, [&](auto tag) {
    using A = typename decltype(tag)::type;
    backward_rows_kernel<A><<<blocks_for(n), kThreads, 0, stream>>>(
        static_cast<const A*>(grad), static_cast<A*>(num), static_cast<A*>(den_sq), static_cast<A*>(plain), labels,
        static_cast<const A*>(masked_lse), static_cast<const A*>(plain_lse), n, K, A(1) / A(batch),
        make_margin<A>(p.scale, p.margin, p.easy_margin, p.clamp_eps), A(p.plain_weight), A(p.masked_weight));
  });
  DPM_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace masked_arcface
}  // namespace dpm_ops
