// CPU kernels of the hierarchical masked pooling: one at::parallel_for over the rows (level, b, c)
// of every level at once, after one over the (b, level) mask resizes.
#include <ATen/Parallel.h>

#include <limits>

#include "hierarchical_mask_pool_driver.h"
#include "../common/register_kernels.h"

namespace dpm_ops::hierarchical_mask_pool {
namespace {

// About this many elements per task: rows are short (H_l W_l), so they go in bundles.
constexpr int64_t kElementGrain = 32768;

int64_t row_grain(const LevelPack& p) {
  int64_t hw = 1;
  for (int l = 0; l < p.count; ++l) hw = max_of(hw, p.level[l].height * p.level[l].width);
  return max_of<int64_t>(1, kElementGrain / hw);
}

// Where a row of the pack reads and writes.
struct Row {
  int level;
  int64_t b, offset, hw;  // offset: of the row in its level's (B, C, H, W) buffer
  int64_t out_index;      // in the (B, sum C) output
};

// Calls f(row) for the rows [begin, end), walking (level, b, c) incrementally: rows are short, so
// no per-row search or division.
template <typename F> void for_each_row(const LevelPack& p, int64_t begin, int64_t end, F&& f) {
  if (begin >= end) return;
  int l = find_level(p.level, p.count, begin);
  int64_t local = begin - p.level[l].row_begin;
  int64_t b = local / p.level[l].channels, c = local % p.level[l].channels;
  for (int64_t r = begin; r < end; ++r) {
    const LevelDesc& d = p.level[l];
    const int64_t hw = d.height * d.width;
    f(Row{l, b, (b * d.channels + c) * hw, hw, b * p.total_channels + d.out_offset + c});
    if (++c == d.channels) {
      c = 0;
      if (++b == p.batch) {
        b = 0;
        ++l;
        while (l < p.count && p.level[l].channels == 0) ++l;  // levels without rows
      }
    }
  }
}

struct CpuKernels {
  // fp16 / bf16 are computed in fp32 on the CPU; results are returned in the input dtype.
  static at::Tensor prepare(const at::Tensor& t) {
    const bool reduced = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
    return (reduced ? t.to(at::kFloat) : t).contiguous();
  }

  static void resize_mask(const at::Tensor& mask, const LevelPack& p, at::Tensor& weights, at::Tensor& sums) {
    AT_DISPATCH_FLOATING_TYPES(mask.scalar_type(), "hierarchical_mask_pool_resize", [&] {
      const int64_t H = mask.size(2), W = mask.size(3);
      const scalar_t* mp = mask.const_data_ptr<scalar_t>();
      scalar_t* wp = weights.data_ptr<scalar_t>();
      scalar_t* sp = sums.data_ptr<scalar_t>();
      at::parallel_for(0, p.batch * p.count, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / p.count;
          const LevelDesc& d = p.level[i % p.count];
          const scalar_t* plane = mp + b * H * W;
          scalar_t* out = wp + b * p.total_hw + d.weight_offset;
          RowSum sum = 0;
          for (int64_t h = 0; h < d.height; ++h)
            for (int64_t w = 0; w < d.width; ++w) {
              const scalar_t v = area_weight<scalar_t>([&](int64_t k) { return plane[k]; }, H, W, d.height,
                                                       d.width, h, w);
              out[h * d.width + w] = v;
              sum += v;
            }
          sp[i] = static_cast<scalar_t>(sum);
        }
      });
    });
  }

  static void pool(const LevelPack& p, const at::Tensor& weights, const at::Tensor& sums, bool max_mode,
                   at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "hierarchical_mask_pool_forward", [&] {
      const scalar_t* wp = weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* sp = sums.defined() ? sums.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, p.total_rows, row_grain(p), [&](int64_t begin, int64_t end) {
        for_each_row(p, begin, end, [&](const Row& row) {
          const LevelDesc& d = p.level[row.level];
          const scalar_t* x = static_cast<const scalar_t*>(d.data) + row.offset;
          const scalar_t* w = wp ? wp + row.b * p.total_hw + d.weight_offset : nullptr;
          scalar_t v;
          if (max_mode && !w) {
            // Branch-free (vectorisable) max; NaN tracked apart, as torch.amax propagates it.
            v = x[0];
            bool nan = false;
            _Pragma("omp simd reduction(max : v) reduction(|| : nan)")
            for (int64_t i = 1; i < row.hw; ++i) {
              v = x[i] > v ? x[i] : v;
              nan = nan || x[i] != x[i];
            }
            if (nan || x[0] != x[0]) v = std::numeric_limits<scalar_t>::quiet_NaN();
          } else if (max_mode) {
            scalar_t best = -std::numeric_limits<scalar_t>::infinity();
            bool any = false;
            for (int64_t i = 0; i < row.hw; ++i)
              if (selected(w[i])) {
                best = max_update(best, x[i]);
                any = true;
              }
            v = any ? best : scalar_t(0);
          } else {
            RowSum sum = 0;
            if (w) {
              _Pragma("omp simd reduction(+ : sum)")
              for (int64_t i = 0; i < row.hw; ++i) sum += RowSum(w[i]) * RowSum(x[i]);
            } else {
              _Pragma("omp simd reduction(+ : sum)")
              for (int64_t i = 0; i < row.hw; ++i) sum += RowSum(x[i]);
            }
            v = static_cast<scalar_t>(safe_divide(sum, sp ? RowSum(sp[row.b * p.count + row.level]) : RowSum(row.hw)));
          }
          op[row.out_index] = v;
        });
      });
    });
  }

  static void pool_backward(const LevelPack& p, const at::Tensor& grad, const at::Tensor& weights,
                            const at::Tensor& sums, const at::Tensor& out, bool max_mode) {
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "hierarchical_mask_pool_backward", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const scalar_t* op = out.const_data_ptr<scalar_t>();
      const scalar_t* wp = weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* sp = sums.defined() ? sums.const_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, p.total_rows, row_grain(p), [&](int64_t begin, int64_t end) {
        for_each_row(p, begin, end, [&](const Row& row) {
          const LevelDesc& d = p.level[row.level];
          const scalar_t* x = static_cast<const scalar_t*>(d.data) + row.offset;
          scalar_t* gx = static_cast<scalar_t*>(d.grad) + row.offset;
          const scalar_t* w = wp ? wp + row.b * p.total_hw + d.weight_offset : nullptr;
          const scalar_t g = gp[row.out_index];
          if (max_mode) {
            const scalar_t o = op[row.out_index];
            int64_t ties = 0;
            if (w) {
              for (int64_t i = 0; i < row.hw; ++i) ties += selected(w[i]) && x[i] == o;
              for (int64_t i = 0; i < row.hw; ++i) gx[i] = max_grad(g, x[i], o, w[i], ties);
            } else {
              _Pragma("omp simd reduction(+ : ties)")
              for (int64_t i = 0; i < row.hw; ++i) ties += x[i] == o;
              _Pragma("omp simd")
              for (int64_t i = 0; i < row.hw; ++i) gx[i] = max_grad(g, x[i], o, scalar_t(1), ties);
            }
          } else if (w) {
            const scalar_t total = sp[row.b * p.count + row.level];
            _Pragma("omp simd")
            for (int64_t i = 0; i < row.hw; ++i) gx[i] = avg_grad(g, w[i], total);
          } else {
            const scalar_t value = avg_grad(g, scalar_t(1), scalar_t(row.hw));  // the same for every cell
            _Pragma("omp simd")
            for (int64_t i = 0; i < row.hw; ++i) gx[i] = value;
          }
        });
      });
    });
  }
};

}  // namespace

DPM_OPS_KERNELS(CPU,
                "hierarchical_mask_pool", &forward<CpuKernels>,
                "hierarchical_mask_pool_backward", &backward<CpuKernels>)

}  // namespace dpm_ops::hierarchical_mask_pool
