// CPU kernels of DPM's HEM loss: one OpenMP task per sample computes the raw Gram in one pass over
// its logits (norms from the diagonal), the loss, and in the backward the closed-form gradient.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "hem_loss_driver.h"
#include "hem_loss_math.h"

namespace dpm_ops {
namespace hem {
namespace {

constexpr int64_t kSampleGrain = 4;

template <typename scalar_t> scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// The normalised Gram and the inverse norms of one sample a (heads × n).
template <typename scalar_t>
void sample_gram(const scalar_t* a, int64_t heads, int64_t n, scalar_t eps, scalar_t* gram, scalar_t* inv) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = h; i < heads; ++i) gram[h * heads + i] = gram[i * heads + h] = dot(a + h * n, a + i * n, n);
  inv_norms_from_gram(gram, heads, eps, inv, 0, 1);
  normalise_gram(gram, inv, heads, 0, 1);
}

at::Tensor hem_loss_cpu(const at::Tensor& cls_logits, double eps, c10::string_view reduction) {
  const bool mean = check_inputs(cls_logits, eps, std::string(reduction));
  const at::Tensor a = as_compute(cls_logits);
  const int64_t batch = a.size(0), heads = a.size(1), n = a.size(2);
  at::Tensor loss = at::empty({}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "hem_loss_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    std::vector<scalar_t> per_sample(batch);
    at::parallel_for(0, batch, kSampleGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gram(heads * heads), inv(heads);
      for (int64_t b = begin; b < end; ++b) {
        sample_gram(ap + b * heads * n, heads, n, scalar_t(eps), gram.data(), inv.data());
        per_sample[b] = sample_loss(gram.data(), heads);
      }
    });
    scalar_t total = 0;  // fixed order: deterministic
    for (int64_t b = 0; b < batch; ++b) total += per_sample[b];
    loss.fill_(total * scalar_t(sample_weight(batch, mean)));
  });
  return loss;
}

at::Tensor hem_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& cls_logits, double eps,
                                 c10::string_view reduction) {
  const bool mean = check_inputs(cls_logits, eps, std::string(reduction));
  const at::Tensor a = as_compute(cls_logits);
  const int64_t batch = a.size(0), heads = a.size(1), n = a.size(2);
  at::Tensor grad_a = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "hem_loss_backward_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_a.data_ptr<scalar_t>();
    const scalar_t c = grad_scale(scalar_t(grad.item<double>() * sample_weight(batch, mean)), heads);
    at::parallel_for(0, batch, kSampleGrain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> gram(heads * heads), inv(heads), row(n);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* sa = ap + b * heads * n;
        scalar_t* sg = gp + b * heads * n;
        sample_gram(sa, heads, n, scalar_t(eps), gram.data(), inv.data());
        for (int64_t h = 0; h < heads; ++h) {
          std::fill(row.begin(), row.end(), scalar_t(0));
          for (int64_t i = 0; i < heads; ++i) {
            const scalar_t m = mix_coef(gram.data(), inv.data(), heads, h, i, c);
            const scalar_t* ai = sa + i * n;
            scalar_t* rp = row.data();
            _Pragma("omp simd")
            for (int64_t j = 0; j < n; ++j) rp[j] += m * ai[j];
          }
          const scalar_t d = row_projection(gram.data(), heads, h, c);
          const scalar_t* ah = sa + h * n;
          scalar_t* gh = sg + h * n;
          _Pragma("omp simd")
          for (int64_t j = 0; j < n; ++j) gh[j] = grad_logit(inv[h], ah[j], row[j], d);
        }
      }
    });
  });
  return grad_a.to(cls_logits.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(dpm_ops, CPU, m) {
  m.impl("hem_loss", &hem_loss_cpu);
  m.impl("hem_loss_backward", &hem_loss_backward_cpu);
}

}  // namespace hem
}  // namespace dpm_ops
