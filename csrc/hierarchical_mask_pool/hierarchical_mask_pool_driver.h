// Hierarchical masked pooling written once for any device: argument checks, the packed level
// descriptors, buffers; `Kernels` supplies the two passes (mask resize, pooling) per device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include <optional>
#include <string_view>
#include <vector>

#include "../common/backward_checks.h"
#include "../common/compute_type.h"
#include "hierarchical_mask_pool_math.h"

namespace dpm_ops::hierarchical_mask_pool {

// Python checks the same first, with the same messages; these guard direct torch.ops callers.
inline bool check_inputs(at::TensorList features, const std::optional<at::Tensor>& mask, std::string_view mode) {
  TORCH_CHECK_VALUE(mode == "avg" || mode == "max", "hierarchical_mask_pool: mode must be 'avg' or 'max', got '",
                    std::string(mode), "'");
  TORCH_CHECK_VALUE(!features.empty(), "hierarchical_mask_pool: features must hold at least one map");
  TORCH_CHECK_VALUE(features.size() <= size_t(kMaxLevels), "hierarchical_mask_pool: features may hold at most ",
                    kMaxLevels, " maps, got ", features.size());
  const at::Tensor& first = features[0];
  TORCH_CHECK_VALUE(at::isFloatingType(first.scalar_type()),
                    "hierarchical_mask_pool: features must be floating point, got ", first.scalar_type());
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK_VALUE(f.dim() == 4, "hierarchical_mask_pool: features[", l, "] must be 4-D (B, C, H, W), got ",
                      f.dim(), "-D");
    TORCH_CHECK_VALUE(f.size(0) == first.size(0), "hierarchical_mask_pool: features[", l, "] has batch ",
                      f.size(0), ", features[0] has ", first.size(0));
    TORCH_CHECK_VALUE(f.size(2) > 0 && f.size(3) > 0, "hierarchical_mask_pool: features[", l,
                      "] has an empty spatial size ", f.sizes());
    TORCH_CHECK_VALUE(f.scalar_type() == first.scalar_type() && f.device() == first.device(),
                      "hierarchical_mask_pool: features[", l, "] must share dtype and device with features[0]");
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(0) == first.size(0) && m.size(1) == 1 && m.size(2) > 0 &&
                          m.size(3) > 0,
                      "hierarchical_mask_pool: mask must be (B, 1, H, W) with B = ", first.size(0), ", got ",
                      m.sizes());
    // the features' dtype or their compute type (float16 maps' weights in float32: small ones survive)
    const bool dtype_ok = m.scalar_type() == first.scalar_type() || m.scalar_type() == compute_type(first.scalar_type());
    TORCH_CHECK_VALUE(dtype_ok && m.device() == first.device(),
                      "hierarchical_mask_pool: mask must share dtype and device with the features");
  }
  return mode == "max";
}

// Descriptors of contiguous `features` (and their gradients, when given).
inline LevelPack pack_levels(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>* grads) {
  LevelPack p{};
  p.count = static_cast<int>(features.size());
  p.batch = features[0].size(0);
  for (int l = 0; l < p.count; ++l) {
    const at::Tensor& f = features[l];
    LevelDesc& d = p.level[l];
    d.data = f.const_data_ptr();
    d.grad = grads ? (*grads)[l].data_ptr() : nullptr;
    d.channels = f.size(1);
    d.height = f.size(2);
    d.width = f.size(3);
    d.row_begin = p.total_rows;
    d.out_offset = p.total_channels;
    d.weight_offset = p.total_hw;
    p.total_rows += p.batch * d.channels;
    p.total_channels += d.channels;
    p.total_hw += d.height * d.width;
  }
  return p;
}

// The resized mask of every level, packed (B, sum_l H_l W_l), and its sums per (b, level) (B, L),
// in the accumulation type; undefined tensors without a mask.
template <class Kernels>
std::pair<at::Tensor, at::Tensor> resized_weights(const std::optional<at::Tensor>& mask, const LevelPack& p,
                                                  at::ScalarType acc) {
  if (!mask.has_value()) return {at::Tensor(), at::Tensor()};
  const at::Tensor m = Kernels::prepare(*mask);
  const auto opts = m.options().dtype(acc);
  at::Tensor weights = at::empty({p.batch, p.total_hw}, opts), sums = at::empty({p.batch, p.count}, opts);
  Kernels::resize_mask(m, p, weights, sums);
  return {weights, sums};
}

inline std::vector<at::Tensor> prepared(at::TensorList features, at::Tensor (*prepare)(const at::Tensor&)) {
  std::vector<at::Tensor> out;
  out.reserve(features.size());
  for (const at::Tensor& f : features) out.push_back(prepare(f));
  return out;
}

// The ops on any device (the schemas' arguments), with that device's Kernels.
template <class Kernels>
at::Tensor forward(at::TensorList features_in, const std::optional<at::Tensor>& mask, c10::string_view mode) {
  const bool max_mode = check_inputs(features_in, mask, mode);
  const c10::OptionalDeviceGuard guard(at::device_of(features_in[0]));
  const std::vector<at::Tensor> features = prepared(features_in, &Kernels::prepare);
  const LevelPack p = pack_levels(features, nullptr);
  const auto [weights, sums] = resized_weights<Kernels>(mask, p, compute_type(features[0].scalar_type()));
  at::Tensor out = at::empty({p.batch, p.total_channels}, features[0].options());
  Kernels::pool(p, weights, sums, max_mode, out);
  return out.to(features_in[0].scalar_type());
}

template <class Kernels>
std::vector<at::Tensor> backward(const at::Tensor& grad, at::TensorList features_in,
                                 const std::optional<at::Tensor>& mask, const at::Tensor& out,
                                 c10::string_view mode) {
  const bool max_mode = check_inputs(features_in, mask, mode);
  int64_t channels = 0;
  for (const at::Tensor& f : features_in) channels += f.size(1);
  const int64_t shape[] = {features_in[0].size(0), channels};
  for (const auto& [name, t] : {std::pair{"grad", &grad}, std::pair{"out", &out}})
    check_from_forward("hierarchical_mask_pool_backward", name, *t, shape, features_in[0].scalar_type(),
                       features_in[0].device());
  const c10::OptionalDeviceGuard guard(at::device_of(features_in[0]));
  const std::vector<at::Tensor> features = prepared(features_in, &Kernels::prepare);
  std::vector<at::Tensor> grads;
  for (const at::Tensor& f : features) grads.push_back(at::empty_like(f));
  const LevelPack p = pack_levels(features, &grads);
  const auto [weights, sums] = resized_weights<Kernels>(mask, p, compute_type(features[0].scalar_type()));
  Kernels::pool_backward(p, Kernels::prepare(grad), weights, sums, Kernels::prepare(out), max_mode);
  for (size_t l = 0; l < grads.size(); ++l) grads[l] = grads[l].to(features_in[l].scalar_type());
  return grads;
}

}  // namespace dpm_ops::hierarchical_mask_pool
