// For kernels that call ATen (at::mm, at::bmm) inside a custom op. A custom op without an autocast
// kernel leaves the autocast keys live in the thread's dispatch state, so those inner calls would be
// recast to bf16 / fp16 under torch.autocast (and the fp32 buffers around them would no longer
// match). Constructing a NoAutocastGuard at the entry point keeps them in the op's compute dtype.
#pragma once

#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace dpm_ops {

struct NoAutocastGuard {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace dpm_ops
