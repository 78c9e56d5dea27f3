// CPU kernels of the fused masked ArcFace cross-entropy: OpenMP row passes between MKL GEMMs.
// Each row pass computes the rows' CE and, in place, the gradient coefficients the next GEMMs take.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "masked_arcface_driver.h"

namespace dpm_ops {
namespace masked_arcface {
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

struct CpuKernels {
  // The masked cosine's GEMM operands (see masked_cosine::prepare): scaled = v·inv·mult and
  // second = mult² (or scaled = v·inv, second = scaled² without mult), inv = 1/max(‖v‖, eps).
  static void prepare_rows(const at::Tensor& v, const at::Tensor& mult, double eps, at::Tensor& scaled,
                           at::Tensor& second, at::Tensor& inv) {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "masked_arcface_prepare_rows", [&] {
      const int64_t cols = v.size(1);
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      const scalar_t* mp = static_cast<const scalar_t*>(data_or_null(mult));
      scalar_t *sp = scaled.data_ptr<scalar_t>(), *qp = second.data_ptr<scalar_t>(), *ip = inv.data_ptr<scalar_t>();
      at::parallel_for(0, v.size(0), 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = vp + r * cols;
          scalar_t sum_sq = 0;
          for (int64_t c = 0; c < cols; ++c) sum_sq += row[c] * row[c];
          const scalar_t s = inv_norm(sum_sq, scalar_t(eps));
          ip[r] = s;
          for (int64_t c = 0, i = r * cols; c < cols; ++c, ++i) {
            sp[i] = mp ? row[c] * s * mp[i] : row[c] * s;
            qp[i] = mp ? mp[i] * mp[i] : sp[i] * sp[i];
          }
        }
      });
    });
  }

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

  // Rows' gradient through the normalisation (staged in the output, rescaled in a second sweep).
  template <typename A, typename GradHat>
  static void rows_normalize_backward(const A* v, const A* inv, int64_t rows, int64_t cols, const A* extra,
                                      A* grad_v, GradHat grad_hat) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const A* row = v + r * cols;
        A* grow = grad_v + r * cols;
        A dot = 0;
        for (int64_t c = 0; c < cols; ++c) {
          grow[c] = grad_hat(r, c, row[c] * inv[r]);
          dot += row[c] * inv[r] * grow[c];
        }
        const bool clamped = inv[r] >= A(1) / A(kEps);
        for (int64_t c = 0, i = r * cols; c < cols; ++c, ++i)
          grow[c] = normalize_backward(grow[c], row[c] * inv[r], dot, inv[r], clamped) + (extra ? extra[i] : A(0));
      }
    });
  }

  static void query_rows_backward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& inv,
                                  const at::Tensor& u, const at::Tensor& v, const at::Tensor& plain_grad,
                                  at::Tensor& grad_x, at::Tensor& grad_mask) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_arcface_query_backward", [&] {
      using A = scalar_t;
      const int64_t cols = x.size(1);
      const A *mp = mask.const_data_ptr<A>(), *up = u.const_data_ptr<A>(), *vp = v.const_data_ptr<A>();
      A* gm = grad_mask.data_ptr<A>();
      rows_normalize_backward<A>(x.const_data_ptr<A>(), inv.const_data_ptr<A>(), x.size(0), cols,
                                 static_cast<const A*>(data_or_null(plain_grad)), grad_x.data_ptr<A>(),
                                 [&](int64_t r, int64_t c, A xh) {
                                   const int64_t i = r * cols + c;
                                   gm[i] = grad_mask_value(xh, mp[i], up[i], vp[i]);
                                   return grad_query_hat(mp[i], up[i]);
                                 });
    });
  }

  static void proto_rows_backward(const at::Tensor& protos, const at::Tensor& inv, const at::Tensor& up,
                                  const at::Tensor& vp, const at::Tensor& plain_grad, at::Tensor& grad_protos) {
    AT_DISPATCH_FLOATING_TYPES(protos.scalar_type(), "masked_arcface_proto_backward", [&] {
      using A = scalar_t;
      const int64_t cols = protos.size(1);
      const A *upp = up.const_data_ptr<A>(), *vpp = vp.const_data_ptr<A>();
      rows_normalize_backward<A>(protos.const_data_ptr<A>(), inv.const_data_ptr<A>(), protos.size(0), cols,
                                 static_cast<const A*>(data_or_null(plain_grad)), grad_protos.data_ptr<A>(),
                                 [&](int64_t r, int64_t c, A ph) {
                                   const int64_t i = r * cols + c;
                                   return grad_proto_hat(ph, upp[i], vpp[i]);
                                 });
    });
  }
};

Params params(double scale, double margin, bool easy_margin, double clamp_eps, double plain_weight,
              double masked_weight) {
  return {scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_arcface_ce_cpu(
    const at::Tensor& features, const at::Tensor& mask, const at::Tensor& weight, const at::Tensor& labels,
    double scale, double margin, bool easy_margin, double clamp_eps, double plain_weight, double masked_weight,
    bool with_grad) {
  const Params p = params(scale, margin, easy_margin, clamp_eps, plain_weight, masked_weight);
  check_inputs(features, mask, weight, labels, p);
  return forward<CpuKernels>(features.contiguous(), mask.contiguous(), weight.contiguous(), labels.contiguous(), p,
                             with_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(dpm_ops, CPU, m) {
  m.impl("masked_arcface_ce", &masked_arcface_ce_cpu);
}

}  // namespace masked_arcface
}  // namespace dpm_ops
