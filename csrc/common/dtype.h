// The storage dtypes the CUDA kernels take, named without torch headers.
#pragma once

namespace dpm_ops {

enum class Dtype { kFloat, kDouble, kHalf, kBFloat16 };

}  // namespace dpm_ops
