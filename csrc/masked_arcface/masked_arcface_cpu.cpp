// CPU kernels of the fused masked ArcFace cross-entropy: OpenMP row passes between MKL GEMMs.
// Each row pass computes the rows' CE and, in place, the gradient coefficients the next GEMMs take.
#include <ATen/Parallel.h>

#include <atomic>

#include "../masked_cosine/masked_cosine_cpu_kernels.h"
#include "masked_arcface_driver.h"
#include "../common/register_kernels.h"

namespace dpm_ops::masked_arcface {
namespace {

using masked_cosine::backward_coef;
using masked_cosine::cosine;
using masked_cosine::grad_mask_value;
using masked_cosine::grad_proto_hat;
using masked_cosine::grad_query_hat;
using masked_cosine::inv_norm;
using masked_cosine::normalize_backward;

constexpr int64_t kRowGrain = 4;

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// The masked cosine's CPU passes (prepare_rows: the GEMM operands, with the finiteness check),
// plus the loss rows and the backward row passes with the plain branch's gradient added.
struct CpuKernels : masked_cosine::CpuKernels {
  static void check_labels(const at::Tensor&, int64_t) {}  // masked_rows checks them in its own pass

  // Per row: cosines, ArcFace logits, their log-sum-exp; row_loss = masked_w · (lse − l[y])
  // (the batch mean comes later). With `with_grad`, in place: num -> g_num, den_sq -> h of dLoss/dcos.
  static void masked_rows(at::Tensor num, at::Tensor den_sq, const at::Tensor& labels, const Params& p,
                          int64_t batch, bool with_grad, at::Tensor row_loss) {
    AT_DISPATCH_FLOATING_TYPES(num.scalar_type(), "masked_arcface_masked_rows", [&] {
      using A = scalar_t;
      const Margin<A> m = make_margin<A>(p.scale, p.margin, p.easy_margin, p.clamp_eps);
      const A g = A(p.masked_weight) / A(batch);
      const int64_t K = num.size(1);
      A *np = num.data_ptr<A>(), *dp = den_sq.data_ptr<A>(), *loss = row_loss.data_ptr<A>();
      const int64_t* lp = labels.const_data_ptr<int64_t>();
      std::atomic<bool> labels_ok{true};
      at::parallel_for(0, num.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t y = lp[r];
          if (y < 0 || y >= K) {
            labels_ok = false;
            continue;
          }
          A *nr = np + r * K, *dr = dp + r * K;
          Lse<A> acc = lse_empty<A>();
          for (int64_t k = 0; k < K; ++k) acc = lse_add(acc, arc_logit(cosine(nr[k], dr[k], A(kEps)), k == y, m));
          const A lse = lse_value(acc);
          loss[r] = A(p.masked_weight) * (lse - arc_logit(cosine(nr[y], dr[y], A(kEps)), true, m));
          if (!with_grad) continue;
          for (int64_t k = 0; k < K; ++k) {
            const A c = cosine(nr[k], dr[k], A(kEps));
            const A prob = exp_of(arc_logit(c, k == y, m) - lse);
            const auto coef = backward_coef(grad_cosine(c, k == y, prob, g, m), c, dr[k], A(kEps));
            nr[k] = coef.g_num;
            dr[k] = coef.h;
          }
        }
      });
      TORCH_CHECK_VALUE(labels_ok, "masked_arcface_cross_entropy: labels must lie in [0, K = ", K, ")");
    });
  }

  // Per row of plain logits: row_loss += plain_w · (lse − plain[y]); with `with_grad`, in place:
  // plain -> dLoss/dplain.
  static void plain_rows(at::Tensor plain, const at::Tensor& labels, const Params& p, int64_t batch, bool with_grad,
                         at::Tensor row_loss) {
    AT_DISPATCH_FLOATING_TYPES(plain.scalar_type(), "masked_arcface_plain_rows", [&] {
      using A = scalar_t;
      const A g = A(p.plain_weight) / A(batch);
      const int64_t K = plain.size(1);
      A *pp = plain.data_ptr<A>(), *loss = row_loss.data_ptr<A>();
      const int64_t* lp = labels.const_data_ptr<int64_t>();
      at::parallel_for(0, plain.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          A* pr = pp + r * K;
          const int64_t y = lp[r];  // checked by masked_rows
          Lse<A> acc = lse_empty<A>();
          for (int64_t k = 0; k < K; ++k) acc = lse_add(acc, pr[k]);
          const A lse = lse_value(acc);
          loss[r] += A(p.plain_weight) * (lse - pr[y]);
          if (with_grad)
            for (int64_t k = 0; k < K; ++k) pr[k] = grad_plain(exp_of(pr[k] - lse), k == y, g);
        }
      });
    });
  }

  // Rows' gradient through the normalisation, from the gradient w.r.t. the normalised row staged in
  // `grad_v`; adds `extra` (the plain branch's gradient) when given. Vectorised sweeps.
  template <typename A>
  static void rows_normalize_backward(const A* v, const A* inv, int64_t rows, int64_t cols, const A* extra,
                                      A* grad_v) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const A* row = v + r * cols;
        A* grow = grad_v + r * cols;
        const A s = inv[r];
        A dot = 0;
        _Pragma("omp simd reduction(+ : dot)")
        for (int64_t c = 0; c < cols; ++c) dot += row[c] * s * grow[c];
        const bool clamped = s >= A(1) / A(kEps);  // loop-invariant: the compiler unswitches it
        _Pragma("omp simd")
        for (int64_t c = 0; c < cols; ++c) grow[c] = normalize_backward(grow[c], row[c] * s, dot, s, clamped);
        if (extra) {
          const A* erow = extra + r * cols;
          _Pragma("omp simd")
          for (int64_t c = 0; c < cols; ++c) grow[c] += erow[c];
        }
      }
    });
  }

  static void query_rows_backward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& inv,
                                  const at::Tensor& u, const at::Tensor& v, const at::Tensor& plain_grad,
                                  at::Tensor& grad_x, at::Tensor& grad_mask) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_arcface_query_backward", [&] {
      using A = scalar_t;
      const int64_t n = x.numel(), cols = x.size(1);
      const A *xp = x.const_data_ptr<A>(), *ip = inv.const_data_ptr<A>(), *mp = mask.const_data_ptr<A>();
      const A *up = u.const_data_ptr<A>(), *vp = v.const_data_ptr<A>();
      A *gx = grad_x.data_ptr<A>(), *gm = grad_mask.data_ptr<A>();
      at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
        _Pragma("omp simd")
        for (int64_t i = begin; i < end; ++i) {
          gm[i] = grad_mask_value(xp[i] * ip[i / cols], mp[i], up[i], vp[i]);
          gx[i] = grad_query_hat(mp[i], up[i]);  // staged: the gradient w.r.t. the normalised row
        }
      });
      rows_normalize_backward<A>(xp, ip, x.size(0), cols, static_cast<const A*>(data_or_null(plain_grad)), gx);
    });
  }

  static void proto_rows_backward(const at::Tensor& protos, const at::Tensor& inv, const at::Tensor& up,
                                  const at::Tensor& vp, const at::Tensor& plain_grad, at::Tensor& grad_protos) {
    AT_DISPATCH_FLOATING_TYPES(protos.scalar_type(), "masked_arcface_proto_backward", [&] {
      using A = scalar_t;
      const int64_t cols = protos.size(1);
      const A *pp = protos.const_data_ptr<A>(), *ip = inv.const_data_ptr<A>();
      const A *upp = up.const_data_ptr<A>(), *vpp = vp.const_data_ptr<A>();
      A* gp = grad_protos.data_ptr<A>();
      at::parallel_for(0, protos.size(0), 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const A s = ip[r];
          _Pragma("omp simd")
          for (int64_t c = r * cols; c < (r + 1) * cols; ++c) gp[c] = grad_proto_hat(pp[c] * s, upp[c], vpp[c]);
        }
      });
      rows_normalize_backward<A>(pp, ip, protos.size(0), cols, static_cast<const A*>(data_or_null(plain_grad)), gp);
    });
  }
};

}  // namespace

DPM_OPS_KERNELS(CPU, "masked_arcface_ce", &masked_arcface_ce<CpuKernels>)

}  // namespace dpm_ops::masked_arcface
