// CPU kernel of MaskReID's ranking loss: S = X Xᵀ (MKL), then one OpenMP pass over the anchor rows
// that mines, sums and writes the closed-form dL/dS, and a symmetrising pass (dL/dX = (G + Gᵀ) X).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../common/no_autocast.h"
#include "maskreid_ranking_loss_driver.h"
#include "maskreid_ranking_loss_math.h"
#include "../common/register_kernels.h"

namespace dpm_ops::maskreid_ranking {
namespace {

// Work (similarity entries touched) per OpenMP task: small batches run on one thread, since a
// parallel region costs more than their whole row pass (and much more on a busy machine).
constexpr int64_t kWorkGrain = 1 << 15;

int64_t row_grain(int64_t work_per_row) { return std::max<int64_t>(1, kWorkGrain / std::max<int64_t>(1, work_per_row)); }

// Returns (loss, G + Gᵀ) with G = dL/dS, both in the compute dtype.
std::tuple<at::Tensor, at::Tensor> maskreid_ranking_loss_cpu(const at::Tensor& embeddings, const at::Tensor& labels_in,
                                                             double alpha, double lam, c10::string_view neg_mode,
                                                             c10::string_view pos_mode) {
  const NoAutocastGuard no_autocast;
  check_inputs(embeddings, labels_in);
  const Options<double> options = parse_options(alpha, lam, std::string(neg_mode), std::string(pos_mode));
  const at::Tensor x = as_compute(embeddings);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t n = x.size(0);
  const at::Tensor sim = at::mm(x, x.t()).contiguous();
  at::Tensor coef = at::empty({n, n}, x.options());
  at::Tensor loss = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "maskreid_ranking_loss_cpu", [&] {
    const scalar_t* s = sim.const_data_ptr<scalar_t>();
    const int64_t* lp = labels.const_data_ptr<int64_t>();
    scalar_t* cp = coef.data_ptr<scalar_t>();
    const SerialReduce serial;
    const int64_t grain = row_grain(n), rows_grain = row_grain(options.pos_mode == PosMode::kAllEq5 ? n * n : n);
    std::atomic<int64_t> anchors{0};
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      for (int64_t k = begin; k < end; ++k) local += num_positives(lp, k, n, 0, 1, serial) > 0;
      anchors += local;
    });
    const scalar_t scale = scalar_t(1) / scalar_t(anchors.load() > 0 ? anchors.load() : 1);
    const Options<scalar_t> o = cast<scalar_t>(options);
    std::vector<scalar_t> row_losses(n);
    at::parallel_for(0, n, rows_grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        row_losses[k] = row_loss(s + k * n, lp, k, n, o, scale, 0, 1, serial, cp + k * n);
    });
    // G + Gᵀ in place, one (k, j > k) pair per visit; G's diagonal is 0 (a sample is neither its
    // own positive nor negative).
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        for (int64_t j = k + 1; j < n; ++j) cp[k * n + j] = cp[j * n + k] = cp[k * n + j] + cp[j * n + k];
    });
    scalar_t total = 0;  // fixed order: deterministic
    for (int64_t k = 0; k < n; ++k) total += row_losses[k];
    loss.fill_(total);
  });
  return {loss, coef};
}

}  // namespace

DPM_OPS_KERNELS(CPU,
                "maskreid_ranking_loss", &maskreid_ranking_loss_cpu,
                "maskreid_ranking_loss_backward", &backward)

}  // namespace dpm_ops::maskreid_ranking
