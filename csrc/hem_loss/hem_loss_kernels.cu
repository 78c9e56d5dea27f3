// CUDA kernels of DPM's HEM loss. No torch headers: see hem_loss_cuda.h. The per-sample maths is
// hem_loss_math.h's; one block per sample keeps its Gram in shared memory.
#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "../common/warp_reduce.cuh"
#include "hem_loss_cuda.h"
#include "hem_loss_math.h"

namespace dpm_ops::hem::cuda {
namespace {

constexpr int kThreads = 256;

// Shared layout: gram (heads²), mix (heads²), inv (heads), proj (heads).
template <typename A> struct Shared {
  A* gram;
  A* mix;
  A* inv;
  A* proj;
};

template <typename A> __device__ Shared<A> shared_layout(int64_t heads) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* base = reinterpret_cast<A*>(smem);
  return Shared<A>{base, base + heads * heads, base + 2 * heads * heads, base + 2 * heads * heads + heads};
}

// The normalised Gram and inverse norms of sample `a` (heads × n) into shared memory: one warp per
// upper-triangle entry of the raw Gram, then the norms from its diagonal.
template <typename T, typename A>
__device__ void sample_gram(const T* __restrict__ a, int64_t heads, int64_t n, A eps, const Shared<A>& s) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const WarpReduce reduce;
  for (int64_t e = warp; e < heads * heads; e += warps) {
    const int64_t h = e / heads, i = e % heads;
    if (i < h) continue;  // uniform across the warp
    A partial = A(0);
    for (int64_t j = lane; j < n; j += 32) partial += to_acc<A>(a[h * n + j]) * to_acc<A>(a[i * n + j]);
    partial = reduce.sum(partial);
    if (lane == 0) s.gram[h * heads + i] = s.gram[i * heads + h] = partial;
  }
  __syncthreads();
  inv_norms_from_gram(s.gram, heads, eps, s.inv, threadIdx.x, blockDim.x);
  __syncthreads();
  normalise_gram(s.gram, s.inv, heads, threadIdx.x, blockDim.x);
  __syncthreads();
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ logits, int64_t heads, int64_t n, A eps, A* __restrict__ per_sample) {
  const int64_t b = blockIdx.x;
  const Shared<A> s = shared_layout<A>(heads);
  sample_gram(logits + b * heads * n, heads, n, eps, s);
  if (threadIdx.x == 0) per_sample[b] = sample_loss(s.gram, heads);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const A* __restrict__ grad, const T* __restrict__ logits, int64_t heads, int64_t n, A eps, A weight,
                T* __restrict__ grad_logits) {
  const int64_t b = blockIdx.x;
  const T* a = logits + b * heads * n;
  const Shared<A> s = shared_layout<A>(heads);
  sample_gram(a, heads, n, eps, s);
  const A c = grad_scale(grad[0] * weight, heads);
  for (int64_t h = threadIdx.x; h < heads; h += blockDim.x) s.proj[h] = row_projection(s.gram, heads, h, c);
  for (int64_t e = threadIdx.x; e < heads * heads; e += blockDim.x)
    s.mix[e] = mix_coef(s.gram, s.inv, heads, e / heads, e % heads, c);
  __syncthreads();
  T* out = grad_logits + b * heads * n;
  for (int64_t e = threadIdx.x; e < heads * n; e += blockDim.x) {  // consecutive threads along N: coalesced
    const int64_t h = e / n, j = e % n;
    A grad_hat = A(0);
    for (int64_t i = 0; i < heads; ++i) grad_hat += s.mix[h * heads + i] * to_acc<A>(a[i * n + j]);
    out[e] = from_acc<T>(grad_logit(s.inv[h], to_acc<A>(a[e]), grad_hat, s.proj[h]));
  }
}

}  // namespace

int64_t shared_bytes(Dtype dtype, int64_t heads) {
  const int64_t elem = dtype == Dtype::kDouble ? 8 : 4;
  return (2 * heads * heads + 2 * heads) * elem;
}

void forward(Dtype dtype, const void* logits, int64_t batch, int64_t heads, int64_t n, double eps, double weight,
             void* per_sample, void* loss, cudaStream_t stream) {
  launch_typed(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (batch > 0 && heads > 0)
      forward_kernel<T, A><<<static_cast<unsigned int>(batch), kThreads, shared_bytes(dtype, heads), stream>>>(
          typed<T>(logits), heads, n, A(eps), typed<A>(per_sample));
    scaled_sum_kernel<A><<<1, kThreads, 0, stream>>>(typed<A>(per_sample), heads > 0 ? batch : 0,
                                                     A(weight), typed<A>(loss));
  });
}

void backward(Dtype dtype, const void* grad, const void* logits, int64_t batch, int64_t heads, int64_t n, double eps,
              double weight, void* grad_logits, cudaStream_t stream) {
  if (batch == 0 || heads == 0 || n == 0) return;
  launch_typed(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    backward_kernel<T, A><<<static_cast<unsigned int>(batch), kThreads, shared_bytes(dtype, heads), stream>>>(
        typed<A>(grad), typed<T>(logits), heads, n, A(eps), A(weight),
        typed<T>(grad_logits));
  });
}

}  // namespace dpm_ops::hem::cuda
