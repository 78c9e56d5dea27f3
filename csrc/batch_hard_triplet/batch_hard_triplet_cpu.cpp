// CPU kernels of the fused batch-hard soft-margin triplet: one MKL Gram GEMM, OpenMP row passes.
#include <ATen/Parallel.h>

#include <limits>
#include <algorithm>
#include <vector>

#include "batch_hard_triplet_driver.h"
#include "../common/register_kernels.h"

namespace dpm_ops::batch_hard_triplet {
namespace {

struct CpuKernels {
  static void mine(const at::Tensor& sq_norms, const at::Tensor& gram, const at::Tensor& labels, Mined& m) {
    AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "batch_hard_triplet_mine", [&] {
      using A = scalar_t;
      const int64_t B = gram.size(0);
      const A *sq = sq_norms.const_data_ptr<A>(), *gp = gram.const_data_ptr<A>();
      const int64_t* yp = labels.const_data_ptr<int64_t>();
      int64_t *pi = m.pos_index.data_ptr<int64_t>(), *ni = m.neg_index.data_ptr<int64_t>();
      A *ap = m.pos_dist.data_ptr<A>(), *an = m.neg_dist.data_ptr<A>(), *loss = m.row_loss.data_ptr<A>();
      uint8_t* live = m.live.data_ptr<uint8_t>();
      at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          A best_pos = -std::numeric_limits<A>::infinity(), best_neg = std::numeric_limits<A>::infinity();
          int64_t p = -1, n = -1;
          A d2_pos = 0, d2_neg = 0;
          for (int64_t j = 0; j < B; ++j) {
            const A d2 = squared_distance(sq[i], sq[j], gp[i * B + j]);
            const A d = distance(d2);
            if (yp[j] == yp[i]) {
              if (harder_positive(d, best_pos)) best_pos = d, p = j, d2_pos = d2;
            } else if (harder_negative(d, best_neg)) {
              best_neg = d, n = j, d2_neg = d2;
            }
          }
          pi[i] = p;
          ni[i] = n;
          ap[i] = best_pos;
          an[i] = best_neg;
          live[2 * i] = distance_is_live(d2_pos);
          live[2 * i + 1] = n >= 0 && distance_is_live(d2_neg);
          loss[i] = softplus(best_pos - best_neg);
        }
      });
    });
  }

  // grad[j] = sum over the terms touching row j of coef · (x_j − x_other); rows in parallel, each
  // scanning the anchors for its terms (deterministic, no atomics).
  static void gradient(const at::Tensor& x, const Mined& m, int64_t batch, at::Tensor& grad) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_hard_triplet_gradient", [&] {
      using A = scalar_t;
      const int64_t B = x.size(0), C = x.size(1);
      const A* xp = x.const_data_ptr<A>();
      const int64_t *pi = m.pos_index.const_data_ptr<int64_t>(), *ni = m.neg_index.const_data_ptr<int64_t>();
      const A *ap = m.pos_dist.const_data_ptr<A>(), *an = m.neg_dist.const_data_ptr<A>();
      const uint8_t* live = m.live.const_data_ptr<uint8_t>();
      std::vector<A> pos_coef(B), neg_coef(B);
      for (int64_t i = 0; i < B; ++i) {
        const A c = softplus_slope(ap[i] - an[i]) / A(batch);
        pos_coef[i] = pair_coefficient(c, ap[i], live[2 * i] != 0);
        neg_coef[i] = pair_coefficient(-c, an[i], live[2 * i + 1] != 0);
      }
      A* gp = grad.data_ptr<A>();
      at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          A* out = gp + j * C;
          const A* xj = xp + j * C;
          std::fill(out, out + C, A(0));
          auto add = [&](A coef, int64_t other) {  // out += coef · (x_j − x_other)
            if (coef == A(0) || other == j) return;
            const A* xo = xp + other * C;
            _Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c) out[c] += coef * (xj[c] - xo[c]);
          };
          add(pos_coef[j], pi[j]);
          if (ni[j] >= 0) add(neg_coef[j], ni[j]);
          for (int64_t i = 0; i < B; ++i) {
            if (pi[i] == j) add(pos_coef[i], i);
            if (ni[i] == j) add(neg_coef[i], i);
          }
        }
      });
    });
  }
};

}  // namespace

DPM_OPS_KERNELS(CPU, "batch_hard_triplet", &batch_hard_triplet_op<CpuKernels>)

}  // namespace dpm_ops::batch_hard_triplet
