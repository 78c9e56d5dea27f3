// Runs CUDA kernels on the CPU for the tests (tests/cuda_emulation/README.md): a thread block's
// threads are fibers run in turn by one OS thread, switching only at __syncthreads, at the
// warp-level collectives (__syncwarp, __shfl*_sync, __ballot_sync) and at their end. So the
// kernels' own code, their barriers and their warp exchanges run as written, deterministically
// (in one of two orders, Schedule), and a barrier that some threads never reach is reported
// (std::runtime_error naming the kernel) instead of hanging. Blocks run one after the other, so a
// static local is one block's shared memory (`__shared__` is a static here, poisoned before each
// block). Not emulated: concurrent blocks (no kernel here shares data between the blocks of a
// launch), partial warp masks (rejected), atomics, tensor cores and the GPU's rounding where it
// differs from IEEE (fast-math intrinsics, FMA contraction).
#pragma once

#include "emulated_runtime.h"

#include <setjmp.h>
#include <ucontext.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Shared memory: statics in one section, which the emulator fills with 0xff bytes (NaN, -1) before
// each block, so that a read of what the block has not written yet shows.
#define __shared__ static __attribute__((section("emu_shared")))
extern "C" unsigned char __start_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_emu_shared[] __attribute__((weak));

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t(128) << 10;
constexpr unsigned int kFullMask = 0xffffffffu;

// Threads that wait at one barrier until all its live members are there.
struct Barrier {
  int members = 0;
  std::vector<int> waiting;
};

// A thread: entered once through its ucontext (its own stack), then switched to and from with
// _setjmp / _longjmp, which save no signal mask (no system call per switch).
struct Fiber {
  ucontext_t context;
  jmp_buf jump;
  std::unique_ptr<char[]> stack;
  bool started = false, done = false;
  dim3 thread_idx;
};

// The block being run, its fibers and barriers.
struct Block {
  const char* kernel;
  dim3 idx, dim, grid;
  std::vector<Fiber> fibers;
  std::deque<int> ready;  // fibers to run, in turn
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<unsigned char> lanes;  // 32 slots of 16 bytes a warp: the values warp exchanges pass
  std::unique_ptr<std::max_align_t[]> dynamic_shared;
  std::function<void()> body;
  jmp_buf scheduler;
  int current = 0;
};

// The order in which the threads that can run take turns: breadth first (the oldest waiting
// thread next: the warps advance together) or depth first (the newest next: a warp runs ahead as
// far as its barriers let it, which shows a missing __syncthreads). Set by set_schedule().
enum class Schedule : int { kBreadthFirst = 0, kDepthFirst = 1 };
inline Schedule& schedule() {
  static Schedule order = Schedule::kBreadthFirst;
  return order;
}

inline Block*& running() {
  static Block* block = nullptr;
  return block;
}
inline Block& block() { return *running(); }
inline int thread_rank() { return block().current; }
inline int lane() { return thread_rank() % 32; }
inline Barrier& warp_barrier() { return block().warps[thread_rank() / 32]; }

// Once every live member waits, they all run again (in the order they arrived).
inline bool release_if_complete(Barrier& b) {
  if (b.waiting.empty() || int(b.waiting.size()) != b.members) return false;
  for (int f : b.waiting) block().ready.push_back(f);
  b.waiting.clear();
  return true;
}

// The current thread waits at b; returns once every live member has arrived.
inline void arrive_and_wait(Barrier& b) {
  Block& r = block();
  Fiber& self = r.fibers[r.current];
  b.waiting.push_back(r.current);
  if (release_if_complete(b)) {
    r.ready.pop_back();  // the arriving thread itself, which runs on at once
    return;
  }
  if (!_setjmp(self.jump)) _longjmp(r.scheduler, 1);
}

// Called in a fiber, where an exception cannot unwind to the caller: a partial mask ends the process.
inline void check_mask(unsigned int mask, const char* what) {
  if (mask == kFullMask) return;
  std::fprintf(stderr, "emulated CUDA: %s with a partial mask (%#x) in kernel %s is not emulated\n", what, mask,
               block().kernel);
  std::abort();
}

// Every lane of this thread's warp puts `value` in its slot; then read(slots, live lanes) runs in
// each lane before any slot is written again.
template <typename T, typename Read> auto warp_exchange(T value, Read read) {
  static_assert(sizeof(T) <= 16, "warp exchanges of up to 16 bytes");
  const int warp = thread_rank() / 32;
  unsigned char* slots = block().lanes.data() + size_t(warp) * 32 * 16;
  std::memcpy(slots + lane() * 16, &value, sizeof(T));
  arrive_and_wait(warp_barrier());
  const auto out = read(static_cast<const unsigned char*>(slots), warp_barrier().members);
  arrive_and_wait(warp_barrier());
  return out;
}

// The value of lane `source` of this thread's warp (its own where there is no such lane).
template <typename T> T exchange(T value, int source) {
  return warp_exchange(value, [&](const unsigned char* slots, int live) {
    T out = value;
    if (source >= 0 && source < live) std::memcpy(&out, slots + source * 16, sizeof(T));
    return out;
  });
}

inline unsigned int ballot(bool predicate) {
  return warp_exchange(predicate, [](const unsigned char* slots, int live) {
    unsigned int bits = 0;
    for (int l = 0; l < live; ++l) bits |= unsigned(slots[l * 16] != 0) << l;
    return bits;
  });
}

inline void fiber_main() {
  Block& r = block();
  r.body();
  r.fibers[r.current].done = true;
  --r.block.members;
  --warp_barrier().members;
  release_if_complete(r.block);
  release_if_complete(warp_barrier());
  _longjmp(r.scheduler, 1);
}

inline std::string deadlock_report(const Block& r) {
  std::string waiting;
  for (size_t f = 0; f < r.fibers.size(); ++f)
    if (!r.fibers[f].done) waiting += (waiting.empty() ? "" : ", ") + std::to_string(f);
  return std::string("emulated CUDA: kernel ") + r.kernel + " deadlocked in block (" + std::to_string(r.idx.x) + ", " +
         std::to_string(r.idx.y) + ", " + std::to_string(r.idx.z) + "): threads " + waiting +
         " wait at barriers that the others never reach";
}

// Runs the block r.idx: its threads in turn until each is done.
inline void run_block(Block& r, long threads, size_t shared_bytes) {
  if (__start_emu_shared != nullptr) std::memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
  std::memset(r.dynamic_shared.get(), 0xff, shared_bytes);
  r.block = Barrier{int(threads), {}};
  r.warps.assign((threads + 31) / 32, Barrier{});
  r.ready.clear();
  for (long t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    f.started = f.done = false;
    f.thread_idx = dim3(t % r.dim.x, (t / r.dim.x) % r.dim.y, t / (long(r.dim.x) * r.dim.y));
    ++r.warps[t / 32].members;
    r.ready.push_back(int(t));
  }
  while (!r.ready.empty()) {
    if (schedule() == Schedule::kDepthFirst) {
      r.current = r.ready.back();
      r.ready.pop_back();
    } else {
      r.current = r.ready.front();
      r.ready.pop_front();
    }
    Fiber& f = r.fibers[r.current];
    if (_setjmp(r.scheduler)) continue;  // back from the fiber: the next one
    if (f.started) _longjmp(f.jump, 1);
    f.started = true;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    setcontext(&f.context);
  }
  for (const Fiber& f : r.fibers)
    if (!f.done) throw std::runtime_error(deadlock_report(r));
}

// Runs body() as every thread of every block of the grid, block after block.
inline void run(const char* kernel, dim3 grid, dim3 dim, size_t shared_bytes, const std::function<void()>& body) {
  const long threads = long(dim.x) * dim.y * dim.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 ||
      threads == 0 || threads > kMaxThreads || dim.z > 64 ||
      shared_bytes > size_t(kMaxDynamicShared)) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  Block r;
  r.kernel = kernel;
  r.dim = dim;
  r.grid = grid;
  r.body = body;
  r.fibers.resize(threads);
  for (Fiber& f : r.fibers) f.stack.reset(new char[kStackBytes]);
  r.lanes.resize(size_t((threads + 31) / 32) * 32 * 16);
  r.dynamic_shared.reset(new std::max_align_t[shared_bytes / sizeof(std::max_align_t) + 1]);
  struct Restore {
    Block* outer = running();
    ~Restore() { running() = outer; }
  } restore;
  running() = &r;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        r.idx = dim3(bx, by, bz);
        run_block(r, threads, shared_bytes);
      }
}

// `kernel<<<grid, block, shared, stream>>>(args...)` becomes (Launch("kernel", grid, block, shared,
// stream) << [=](auto... a) { kernel(a...); })(args...) (emulate.py rewrites the sources): the
// kernel is called by name, so its template arguments are deduced from the arguments as by nvcc.
struct Launch {
  const char* name;
  dim3 grid, dim;
  size_t shared_bytes;

  Launch(const char* name, dim3 grid, dim3 dim, size_t shared_bytes = 0, cudaStream_t = nullptr)
      : name(name), grid(grid), dim(dim), shared_bytes(shared_bytes) {}

  template <typename Kernel> auto operator<<(Kernel kernel) const {
    return [launch = *this, kernel](auto... args) {
      run(launch.name, launch.grid, launch.dim, launch.shared_bytes, [&] { kernel(args...); });
    };
  }
};

inline unsigned char* dynamic_shared() { return reinterpret_cast<unsigned char*>(block().dynamic_shared.get()); }

}  // namespace emu

// The built-in variables.
#define threadIdx (::emu::block().fibers[::emu::block().current].thread_idx)
#define blockIdx (::emu::block().idx)
#define blockDim (::emu::block().dim)
#define gridDim (::emu::block().grid)
#define warpSize 32

inline void __syncthreads() { emu::arrive_and_wait(emu::block().block); }
inline void __syncwarp(unsigned int mask = emu::kFullMask) {
  emu::check_mask(mask, "__syncwarp");
  emu::arrive_and_wait(emu::warp_barrier());
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  emu::check_mask(mask, "__ballot_sync");
  return emu::ballot(predicate != 0);
}
template <typename T> T __shfl_sync(unsigned int mask, T value, int source, int width = 32) {
  emu::check_mask(mask, "__shfl_sync");
  return emu::exchange(value, source % width);
}
template <typename T> T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  emu::check_mask(mask, "__shfl_up_sync");
  const int source = emu::lane() - int(delta);
  return emu::exchange(value, source >= 0 ? source : emu::lane());
}
template <typename T> T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  emu::check_mask(mask, "__shfl_down_sync");
  const int source = emu::lane() + int(delta);
  return emu::exchange(value, source < 32 ? source : emu::lane());
}
template <typename T> T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  emu::check_mask(mask, "__shfl_xor_sync");
  return emu::exchange(value, emu::lane() ^ lane_mask);
}

// CUDA's global min / max of mixed arithmetic types.
template <typename A, typename B> std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float __fmul_rn(float a, float b) { return a * b; }  // built without FMA contraction

template <typename Kernel> cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int value) {
  return value >= 0 && value <= emu::kMaxDynamicShared ? cudaSuccess : cudaErrorInvalidValue;
}
