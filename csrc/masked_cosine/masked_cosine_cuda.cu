// CUDA kernels of the masked cosine. No torch headers: see masked_cosine_cuda.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cuda_utils.cuh"
#include "masked_cosine_cuda.h"
#include "masked_cosine_math.h"

namespace dpm_ops {
namespace masked_cosine {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;

// Fused forward tile: BM x BN outputs per block, 256 threads of TM x TN outputs each, C in BK steps.
constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
constexpr int kTileThreads = (BM / TM) * (BN / TN);

template <typename T, typename A>
__global__ void __launch_bounds__(kTileThreads)
forward_kernel(const T* __restrict__ x, const T* __restrict__ mask, const T* __restrict__ protos,
               const A* __restrict__ inv_x, const A* __restrict__ inv_p, int64_t B, int64_t K, int64_t C, A eps,
               T* __restrict__ out, A* __restrict__ den_sq_out) {
  // Operands transposed in shared memory (C-step major) so the inner loop reads rows of TM / TN.
  __shared__ A scaled_s[BK][BM];
  __shared__ A mask_sq_s[BK][BM];
  __shared__ A proto_s[BK][BN];
  const int tid = threadIdx.x;
  const int ty = tid / (BN / TN), tx = tid % (BN / TN);
  const int64_t b0 = int64_t(blockIdx.y) * BM, k0 = int64_t(blockIdx.x) * BN;

  A num[TM][TN], den_sq[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) num[i][j] = den_sq[i][j] = A(0);

  for (int64_t c0 = 0; c0 < C; c0 += BK) {
    for (int i = tid; i < BM * BK; i += kTileThreads) {
      const int r = i / BK, cc = i % BK;  // consecutive threads walk along C: coalesced
      const int64_t b = b0 + r, c = c0 + cc;
      A xv = A(0), mv = A(0);
      if (b < B && c < C) {
        xv = to_acc<A>(x[b * C + c]) * inv_x[b];
        mv = to_acc<A>(mask[b * C + c]);
      }
      scaled_s[cc][r] = xv * mv;
      mask_sq_s[cc][r] = mv * mv;
    }
    for (int i = tid; i < BN * BK; i += kTileThreads) {
      const int r = i / BK, cc = i % BK;
      const int64_t k = k0 + r, c = c0 + cc;
      proto_s[cc][r] = (k < K && c < C) ? to_acc<A>(protos[k * C + c]) * inv_p[k] : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int cc = 0; cc < BK; ++cc) {
      A a[TM], m2[TM], ph[TN], ph2[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        a[i] = scaled_s[cc][ty * TM + i];
        m2[i] = mask_sq_s[cc][ty * TM + i];
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        ph[j] = proto_s[cc][tx * TN + j];
        ph2[j] = ph[j] * ph[j];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          num[i][j] += a[i] * ph[j];
          den_sq[i][j] += m2[i] * ph2[j];
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t b = b0 + ty * TM + i;
    if (b >= B) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t k = k0 + tx * TN + j;
      if (k >= K) continue;
      out[b * K + k] = from_acc<T>(cosine(num[i][j], den_sq[i][j], eps));
      if (den_sq_out != nullptr) den_sq_out[b * K + k] = den_sq[i][j];
    }
  }
}

template <typename T, typename A>
__global__ void prepare_rows_kernel(const T* __restrict__ v, const T* __restrict__ mult, int64_t cols, A eps,
                                    A* __restrict__ scaled, A* __restrict__ second, A* __restrict__ inv) {
  const int64_t row = blockIdx.x;
  const T* vr = v + row * cols;
  A sum_sq = A(0);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const A e = to_acc<A>(vr[c]);
    sum_sq += e * e;
  }
  const A s = inv_norm(block_sum(sum_sq), eps);
  if (threadIdx.x == 0) inv[row] = s;
  if (scaled == nullptr) return;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const int64_t i = row * cols + c;
    const A e = to_acc<A>(vr[c]) * s;
    if (mult != nullptr) {
      const A mv = to_acc<A>(mult[i]);
      scaled[i] = e * mv;
      second[i] = mv * mv;
    } else {
      scaled[i] = e;
      second[i] = e * e;
    }
  }
}

template <typename T, typename A>
__global__ void backward_coefs_kernel(const T* __restrict__ grad, const T* __restrict__ out,
                                      const A* __restrict__ den_sq, int64_t n, A eps, A* __restrict__ g_num,
                                      A* __restrict__ h) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const auto coef = backward_coef(to_acc<A>(grad[i]), to_acc<A>(out[i]), den_sq[i], eps);
    g_num[i] = coef.g_num;
    h[i] = coef.h;
  }
}

// The gradient w.r.t. one element of a normalised row, for query rows (also writing grad_mask,
// once, on the first pass) and for prototype rows.
template <typename T, typename A> struct QueryRowGrad {
  const T* mask;
  const A* u;
  const A* v;
  T* grad_mask;
  __device__ A operator()(int64_t i, A xh, bool first_pass) const {
    const A mv = to_acc<A>(mask[i]);
    if (first_pass) grad_mask[i] = from_acc<T>(grad_mask_value(xh, mv, u[i], v[i]));
    return grad_query_hat(mv, u[i]);
  }
};

template <typename A> struct ProtoRowGrad {
  const A* up;
  const A* vp;
  __device__ A operator()(int64_t i, A ph, bool) const { return grad_proto_hat(ph, up[i], vp[i]); }
};

// One block per row: the gradient w.r.t. the normalised row, then through the normalisation.
template <typename T, typename A, class RowGrad>
__global__ void rows_normalize_backward_kernel(const T* __restrict__ v, const A* __restrict__ inv, int64_t cols,
                                               A eps, RowGrad grad_hat, T* __restrict__ grad_v) {
  const int64_t row = blockIdx.x;
  const A s = inv[row];
  A dot = A(0);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const int64_t i = row * cols + c;
    const A vh = to_acc<A>(v[i]) * s;
    dot += vh * grad_hat(i, vh, true);
  }
  dot = block_sum(dot);
  const bool clamped = s >= A(1) / eps;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const int64_t i = row * cols + c;
    const A vh = to_acc<A>(v[i]) * s;
    grad_v[i] = from_acc<T>(normalize_backward(grad_hat(i, vh, false), vh, dot, s, clamped));
  }
}

unsigned int blocks_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

}  // namespace

void prepare_rows(Dtype dtype, const void* v, const void* mult, int64_t rows, int64_t cols, double eps,
                  void* scaled, void* second, void* inv, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    prepare_rows_kernel<T, A><<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
        static_cast<const T*>(v), static_cast<const T*>(mult), cols, A(eps), static_cast<A*>(scaled),
        static_cast<A*>(second), static_cast<A*>(inv));
  });
  DPM_CUDA_CHECK_LAUNCH();
}

void forward(Dtype dtype, const void* x, const void* mask, const void* protos, const void* inv_x,
             const void* inv_p, int64_t B, int64_t K, int64_t C, double eps, void* out, void* den_sq,
             cudaStream_t stream) {
  if (B == 0 || K == 0) return;
  const dim3 grid(static_cast<unsigned int>((K + BN - 1) / BN), static_cast<unsigned int>((B + BM - 1) / BM));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    forward_kernel<T, A><<<grid, kTileThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(mask), static_cast<const T*>(protos),
        static_cast<const A*>(inv_x), static_cast<const A*>(inv_p), B, K, C, A(eps), static_cast<T*>(out),
        static_cast<A*>(den_sq));
  });
  DPM_CUDA_CHECK_LAUNCH();
}

void backward_coefs(Dtype dtype, const void* grad, const void* out, const void* den_sq, int64_t n, double eps,
                    void* g_num, void* h, cudaStream_t stream) {
  if (n == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    backward_coefs_kernel<T, A><<<blocks_for(n, kRowThreads), kRowThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(out), static_cast<const A*>(den_sq), n, A(eps),
        static_cast<A*>(g_num), static_cast<A*>(h));
  });
  DPM_CUDA_CHECK_LAUNCH();
}

void query_rows_backward(Dtype dtype, const void* x, const void* mask, const void* inv, const void* u,
                         const void* v, int64_t rows, int64_t cols, double eps, void* grad_x, void* grad_mask,
                         cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const QueryRowGrad<T, A> grad_hat{static_cast<const T*>(mask), static_cast<const A*>(u),
                                      static_cast<const A*>(v), static_cast<T*>(grad_mask)};
    rows_normalize_backward_kernel<T, A><<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const A*>(inv), cols, A(eps), grad_hat, static_cast<T*>(grad_x));
  });
  DPM_CUDA_CHECK_LAUNCH();
}

void proto_rows_backward(Dtype dtype, const void* protos, const void* inv, const void* up, const void* vp,
                         int64_t rows, int64_t cols, double eps, void* grad_protos, cudaStream_t stream) {
  if (rows == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const ProtoRowGrad<A> grad_hat{static_cast<const A*>(up), static_cast<const A*>(vp)};
    rows_normalize_backward_kernel<T, A><<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
        static_cast<const T*>(protos), static_cast<const A*>(inv), cols, A(eps), grad_hat,
        static_cast<T*>(grad_protos));
  });
  DPM_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace masked_cosine
}  // namespace dpm_ops
