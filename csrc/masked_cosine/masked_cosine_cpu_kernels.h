// The CPU row / element passes of the masked cosine (OpenMP, vectorised), the `Kernels` of the
// shared GEMM driver; also the base of the fused masked ArcFace CE's CPU passes.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>

#include "masked_cosine_driver.h"
#include "masked_cosine_math.h"

namespace dpm_ops::masked_cosine {

inline constexpr int64_t kRowGrain = 16;
inline constexpr int64_t kElementGrain = 16384;

// Vectorised row helpers (omp simd: the reductions may be reordered, as in any BLAS).
template <typename scalar_t> inline scalar_t row_sum_sq(const scalar_t* row, int64_t cols) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < cols; ++c) sum += row[c] * row[c];
  return sum;
}

// A row's check, free in the pass that sums its squares, the same rule as the Python entry points
// (dpm_ops/ops/_checks.py): its values are finite and its squared norm stays within max / 4, the
// bound every later product and distance keeps under (beyond it huge finite values overflow the
// sums into inf, and the normalised row into 0). The exact scan runs only when the sum fails.
enum class RowState { kOk, kNonFinite, kTooLarge };

template <typename scalar_t> inline RowState row_state(const scalar_t* row, int64_t cols, scalar_t sum_sq) {
  if (sum_sq <= std::numeric_limits<scalar_t>::max() / 4) return RowState::kOk;
  for (int64_t c = 0; c < cols; ++c)
    if (!std::isfinite(row[c])) return RowState::kNonFinite;
  return RowState::kTooLarge;
}

// The Python entry points' messages, word for word.
template <typename scalar_t> void check_row_states(const char* name, bool non_finite, bool too_large) {
  TORCH_CHECK_VALUE(!non_finite, "masked_cosine: ", name, " contains non-finite values (NaN or inf)");
  if (too_large) {
    char limit[32];
    std::snprintf(limit, sizeof(limit), "%.3g", double(std::sqrt(std::numeric_limits<scalar_t>::max()) / 2));
    TORCH_CHECK_VALUE(false, "masked_cosine: ", name, " is too large in magnitude: row norms must stay below ", limit,
                      " in ", sizeof(scalar_t) == 8 ? "float64" : "float32", " arithmetic");
  }
}

struct CpuKernels {
  static constexpr auto operand_type = accumulation_operands;  // fp32 / fp64 operands (MKL)

  // scaled = v * inv_norm(v) * mult (mult omitted: 1);  second = mult^2, or scaled^2 without mult.
  // The first pass over the data doubles as the finiteness check, for free.
  static void prepare_rows(const at::Tensor& v, const at::Tensor& mult, double eps, at::Tensor& scaled,
                           at::Tensor& second, at::Tensor& inv) {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "masked_cosine_prepare_rows", [&] {
      const int64_t rows = v.size(0), cols = v.size(1);
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      const scalar_t* mp = mult.defined() ? mult.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* sp = scaled.data_ptr<scalar_t>();
      scalar_t* qp = second.data_ptr<scalar_t>();
      scalar_t* ip = inv.data_ptr<scalar_t>();
      std::atomic<bool> v_non_finite{false}, v_too_large{false}, mult_non_finite{false}, mult_too_large{false};
      const auto note = [](RowState state, std::atomic<bool>& non_finite, std::atomic<bool>& too_large) {
        if (state == RowState::kNonFinite) non_finite = true;
        if (state == RowState::kTooLarge) too_large = true;
      };
      at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = vp + r * cols;
          scalar_t* srow = sp + r * cols;
          scalar_t* qrow = qp + r * cols;
          const scalar_t sum_sq = row_sum_sq(row, cols);
          note(row_state(row, cols, sum_sq), v_non_finite, v_too_large);
          const scalar_t s = inv_norm(sum_sq, scalar_t(eps));
          ip[r] = s;
          if (mp) {
            const scalar_t* mrow = mp + r * cols;
            scalar_t mult_sum_sq = 0;
            _Pragma("omp simd reduction(+ : mult_sum_sq)")
            for (int64_t c = 0; c < cols; ++c) {
              srow[c] = row[c] * s * mrow[c];
              qrow[c] = mrow[c] * mrow[c];
              mult_sum_sq += qrow[c];
            }
            note(row_state(mrow, cols, mult_sum_sq), mult_non_finite, mult_too_large);
          } else {
            _Pragma("omp simd")
            for (int64_t c = 0; c < cols; ++c) {
              srow[c] = row[c] * s;
              qrow[c] = srow[c] * srow[c];
            }
          }
        }
      });
      check_row_states<scalar_t>(mp ? "x" : "protos", v_non_finite, v_too_large);
      check_row_states<scalar_t>("mask", mult_non_finite, mult_too_large);
    });
  }

  static void cosine_epilogue(at::Tensor& num, const at::Tensor& den_sq, double eps) {
    AT_DISPATCH_FLOATING_TYPES(num.scalar_type(), "masked_cosine_epilogue", [&] {
      scalar_t* np = num.data_ptr<scalar_t>();
      const scalar_t* dp = den_sq.const_data_ptr<scalar_t>();
      at::parallel_for(0, num.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
        _Pragma("omp simd")
        for (int64_t i = begin; i < end; ++i) np[i] = cosine(np[i], dp[i], scalar_t(eps));
      });
    });
  }

  static void backward_coefs(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& den_sq, double eps,
                             at::Tensor& g_num, at::Tensor& h) {
    AT_DISPATCH_FLOATING_TYPES(den_sq.scalar_type(), "masked_cosine_backward_coefs", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* op = out.const_data_ptr<scalar_t>();
      const scalar_t* dp = den_sq.const_data_ptr<scalar_t>();
      scalar_t* np = g_num.data_ptr<scalar_t>();
      scalar_t* hp = h.data_ptr<scalar_t>();
      at::parallel_for(0, den_sq.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
        _Pragma("omp simd")
        for (int64_t i = begin; i < end; ++i) {
          const auto coef = backward_coef(gp[i], op[i], dp[i], scalar_t(eps));
          np[i] = coef.g_num;
          hp[i] = coef.h;
        }
      });
    });
  }

  // For each row: the normalised row vh = v * inv, the gradient w.r.t. vh from `grad_hat(r, c, vh)`,
  // then the gradient through the normalisation into `grad_v`.
  template <typename scalar_t, typename GradHat>
  static void rows_normalize_backward(const scalar_t* v, const scalar_t* inv, int64_t rows, int64_t cols,
                                      scalar_t eps, scalar_t* grad_v, GradHat grad_hat) {
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = v + r * cols;
        scalar_t* grow = grad_v + r * cols;
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < cols; ++c) {
          const scalar_t vh = row[c] * inv[r];
          grow[c] = grad_hat(r, c, vh);  // staged in the output, rescaled below
          dot += vh * grow[c];
        }
        const bool clamped = inv[r] >= scalar_t(1) / eps;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c)
          grow[c] = normalize_backward(grow[c], row[c] * inv[r], dot, inv[r], clamped);
      }
    });
  }

  static void query_rows_backward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& inv,
                                  const at::Tensor& u, const at::Tensor& v, double eps, at::Tensor& grad_x,
                                  at::Tensor& grad_mask) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_cosine_query_backward", [&] {
      const int64_t cols = x.size(1);
      const scalar_t* mp = mask.const_data_ptr<scalar_t>();
      const scalar_t* up = u.const_data_ptr<scalar_t>();
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      scalar_t* gm = grad_mask.data_ptr<scalar_t>();
      rows_normalize_backward<scalar_t>(
          x.const_data_ptr<scalar_t>(), inv.const_data_ptr<scalar_t>(), x.size(0), cols, scalar_t(eps),
          grad_x.data_ptr<scalar_t>(), [&](int64_t r, int64_t c, scalar_t xh) {
            const int64_t i = r * cols + c;
            gm[i] = grad_mask_value(xh, mp[i], up[i], vp[i]);
            return grad_query_hat(mp[i], up[i]);
          });
    });
  }

  static void proto_rows_backward(const at::Tensor& protos, const at::Tensor& inv, const at::Tensor& up,
                                  const at::Tensor& vp, double eps, at::Tensor& grad_protos) {
    AT_DISPATCH_FLOATING_TYPES(protos.scalar_type(), "masked_cosine_proto_backward", [&] {
      const int64_t cols = protos.size(1);
      const scalar_t* upp = up.const_data_ptr<scalar_t>();
      const scalar_t* vpp = vp.const_data_ptr<scalar_t>();
      rows_normalize_backward<scalar_t>(
          protos.const_data_ptr<scalar_t>(), inv.const_data_ptr<scalar_t>(), protos.size(0), cols, scalar_t(eps),
          grad_protos.data_ptr<scalar_t>(), [&](int64_t r, int64_t c, scalar_t ph) {
            const int64_t i = r * cols + c;
            return grad_proto_hat(ph, upp[i], vpp[i]);
          });
    });
  }
};

}  // namespace dpm_ops::masked_cosine
