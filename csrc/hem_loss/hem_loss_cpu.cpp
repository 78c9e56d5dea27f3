// CPU kernels of DPM's HEM loss: the per-sample Gram and mixing products as batched GEMMs (MKL,
// runtime-dispatched SIMD), everything else in fused OpenMP passes over samples / elements: the norms
// from the Gram's diagonal, the loss, and the closed-form gradient written in place.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/no_autocast.h"
#include "hem_loss_driver.h"
#include "hem_loss_math.h"
#include "../common/register_kernels.h"

namespace dpm_ops::hem {
namespace {

// Work (elements touched) per OpenMP task: DPM's batch of 64 × 12² Gram entries runs on one thread,
// since a parallel region costs more than that pass (and much more on a busy machine).
constexpr int64_t kWorkGrain = 1 << 15;

int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, kWorkGrain / std::max<int64_t>(1, work_per_item)); }

// Normalised Grams (B, heads, heads) and inverse norms (B, heads) of the logits a (B, heads, N).
std::tuple<at::Tensor, at::Tensor> normalised_grams(const at::Tensor& a, double eps) {
  at::Tensor gram = at::bmm(a, a.transpose(1, 2)).contiguous();
  const int64_t batch = a.size(0), heads = a.size(1);
  at::Tensor inv = at::empty({batch, heads}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "hem_loss_grams", [&] {
    scalar_t* gp = gram.data_ptr<scalar_t>();
    scalar_t* ip = inv.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(heads * heads), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        inv_norms_from_gram(gp + b * heads * heads, heads, scalar_t(eps), ip + b * heads, 0, 1);
        normalise_gram(gp + b * heads * heads, ip + b * heads, heads, 0, 1);
      }
    });
  });
  return {gram, inv};
}

at::Tensor hem_loss_cpu(const at::Tensor& cls_logits, double eps, c10::string_view reduction) {
  const NoAutocastGuard no_autocast;
  const bool mean = check_inputs(cls_logits, eps, std::string(reduction));
  const at::Tensor a = as_compute(cls_logits);
  const int64_t batch = a.size(0), heads = a.size(1);
  const auto [gram, inv] = normalised_grams(a, eps);
  at::Tensor loss = at::empty({}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "hem_loss_cpu", [&] {
    const scalar_t* gp = gram.const_data_ptr<scalar_t>();
    std::vector<scalar_t> per_sample(batch);
    at::parallel_for(0, batch, grain_for(heads * heads), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) per_sample[b] = sample_loss(gp + b * heads * heads, heads);
    });
    scalar_t total = 0;  // fixed order: deterministic
    for (int64_t b = 0; b < batch; ++b) total += per_sample[b];
    loss.fill_(total * scalar_t(sample_weight(batch, mean)));
  });
  return loss;
}

at::Tensor hem_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& cls_logits, double eps,
                                 c10::string_view reduction) {
  const NoAutocastGuard no_autocast;
  const bool mean = check_inputs(cls_logits, eps, std::string(reduction));
  check_loss_grad("hem_loss_backward", grad);
  const at::Tensor a = as_compute(cls_logits);
  const int64_t batch = a.size(0), heads = a.size(1), n = a.size(2);
  const auto [gram, inv] = normalised_grams(a, eps);
  at::Tensor mix = at::empty_like(gram), proj = at::empty_like(inv);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "hem_loss_backward_coefs", [&] {
    const scalar_t c = grad_scale(scalar_t(grad.item<double>() * sample_weight(batch, mean)), heads);
    const scalar_t* gp = gram.const_data_ptr<scalar_t>();
    const scalar_t* ip = inv.const_data_ptr<scalar_t>();
    scalar_t* mp = mix.data_ptr<scalar_t>();
    scalar_t* pp = proj.data_ptr<scalar_t>();
    at::parallel_for(0, batch, grain_for(heads * heads), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t h = 0; h < heads; ++h) {
          pp[b * heads + h] = row_projection(gp + b * heads * heads, heads, h, c);
          for (int64_t i = 0; i < heads; ++i)
            mp[(b * heads + h) * heads + i] = mix_coef(gp + b * heads * heads, ip + b * heads, heads, h, i, c);
        }
    });
  });
  at::Tensor grad_a = at::bmm(mix, a);  // dÂ, turned into dL/dA in place below
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "hem_loss_backward_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* ip = inv.const_data_ptr<scalar_t>();
    const scalar_t* pp = proj.const_data_ptr<scalar_t>();
    scalar_t* gp = grad_a.data_ptr<scalar_t>();
    at::parallel_for(0, batch * heads, grain_for(n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t r = ip[row], d = pp[row];
        const scalar_t* ar = ap + row * n;
        scalar_t* gr = gp + row * n;
        _Pragma("omp simd")
        for (int64_t j = 0; j < n; ++j) gr[j] = grad_logit(r, ar[j], gr[j], d);
      }
    });
  });
  return grad_a.to(cls_logits.scalar_type());
}

}  // namespace

DPM_OPS_KERNELS(CPU,
                "hem_loss", &hem_loss_cpu,
                "hem_loss_backward", &hem_loss_backward_cpu)

}  // namespace dpm_ops::hem
