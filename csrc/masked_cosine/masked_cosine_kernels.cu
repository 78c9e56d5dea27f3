// CUDA kernels of the masked cosine. No torch headers: see masked_cosine_cuda.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cuda_utils.cuh"
#include "../common/launch.cuh"
#include "masked_cosine_cuda.h"
#include "masked_cosine_math.h"

namespace dpm_ops::masked_cosine::cuda {
namespace {

constexpr int kRowThreads = 256;

// One block per row; the operands are written in O (the accumulation type A, or the input type T
// for tensor-core GEMMs), computed in A.
template <typename T, typename A, typename O>
__global__ void prepare_rows_kernel(const T* __restrict__ v, const T* __restrict__ mult, int64_t cols, A eps,
                                    O* __restrict__ scaled, O* __restrict__ second, A* __restrict__ inv) {
  const int64_t row = blockIdx.x;
  const T* vr = v + row * cols;
  A sum_sq = A(0);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const A e = to_acc<A>(vr[c]);
    sum_sq += e * e;
  }
  const A s = inv_norm(block_sum(sum_sq), eps);
  if (threadIdx.x == 0) inv[row] = s;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const int64_t i = row * cols + c;
    const A e = to_acc<A>(vr[c]) * s;
    if (mult != nullptr) {
      const A mv = to_acc<A>(mult[i]);
      scaled[i] = from_acc<O>(e * mv);
      second[i] = from_acc<O>(mv * mv);
    } else {
      scaled[i] = from_acc<O>(e);
      second[i] = from_acc<O>(e * e);
    }
  }
}

// In place: num (the numerator GEMM's product) becomes the cosine.
template <typename A>
__global__ void cosine_epilogue_kernel(A* __restrict__ num, const A* __restrict__ den_sq, int64_t n, A eps) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    num[i] = cosine(num[i], den_sq[i], eps);
}

template <typename A>
__global__ void backward_coefs_kernel(const A* __restrict__ grad, const A* __restrict__ out,
                                      const A* __restrict__ den_sq, int64_t n, A eps, A* __restrict__ g_num,
                                      A* __restrict__ h) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const auto coef = backward_coef(grad[i], out[i], den_sq[i], eps);
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

void prepare_rows(Dtype dtype, Dtype operand, const void* v, const void* mult, int64_t rows, int64_t cols,
                  double eps, void* scaled, void* second, void* inv, cudaStream_t stream) {
  if (rows == 0) return;
  launch_typed(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    auto run = [&](auto operand_tag) {
      using O = typename decltype(operand_tag)::type;
      prepare_rows_kernel<T, A, O><<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
          typed<T>(v), typed<T>(mult), cols, A(eps), typed<O>(scaled),
          typed<O>(second), typed<A>(inv));
    };
    if (operand == dtype) run(TypeTag<T>{});
    else run(TypeTag<A>{});
  });
}

void cosine_epilogue(Dtype acc, void* num, const void* den_sq, int64_t n, double eps, cudaStream_t stream) {
  if (n == 0) return;
  launch_computed(acc, [&](auto tag) {
    using A = typename decltype(tag)::type;
    cosine_epilogue_kernel<A><<<blocks_for(n, kRowThreads), kRowThreads, 0, stream>>>(
        typed<A>(num), typed<A>(den_sq), n, A(eps));
  });
}

void backward_coefs(Dtype acc, const void* grad, const void* out, const void* den_sq, int64_t n, double eps,
                    void* g_num, void* h, cudaStream_t stream) {
  if (n == 0) return;
  launch_computed(acc, [&](auto tag) {
    using A = typename decltype(tag)::type;
    backward_coefs_kernel<A><<<blocks_for(n, kRowThreads), kRowThreads, 0, stream>>>(
        typed<A>(grad), typed<A>(out), typed<A>(den_sq), n, A(eps), typed<A>(g_num), typed<A>(h));
  });
}

void query_rows_backward(Dtype dtype, const void* x, const void* mask, const void* inv, const void* u,
                         const void* v, int64_t rows, int64_t cols, double eps, void* grad_x, void* grad_mask,
                         cudaStream_t stream) {
  if (rows == 0) return;
  launch_typed(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const QueryRowGrad<T, A> grad_hat{typed<T>(mask), typed<A>(u),
                                      typed<A>(v), typed<T>(grad_mask)};
    rows_normalize_backward_kernel<T, A><<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
        typed<T>(x), typed<A>(inv), cols, A(eps), grad_hat, typed<T>(grad_x));
  });
}

void proto_rows_backward(Dtype dtype, const void* protos, const void* inv, const void* up, const void* vp,
                         int64_t rows, int64_t cols, double eps, void* grad_protos, cudaStream_t stream) {
  if (rows == 0) return;
  launch_typed(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const ProtoRowGrad<A> grad_hat{typed<A>(up), typed<A>(vp)};
    rows_normalize_backward_kernel<T, A><<<static_cast<unsigned int>(rows), kRowThreads, 0, stream>>>(
        typed<T>(protos), typed<A>(inv), cols, A(eps), grad_hat,
        typed<T>(grad_protos));
  });
}

}  // namespace dpm_ops::masked_cosine::cuda
