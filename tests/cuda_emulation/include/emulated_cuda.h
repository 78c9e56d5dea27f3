// Runs CUDA kernels on the CPU for the tests (tests/cuda_emulation/README.md): a thread block's
// threads are fibers run in turn by one OS thread, switching only at __syncthreads, at the
// warp-level collectives (__syncwarp, __shfl*_sync, __ballot_sync) and at their end. So the
// kernels' own code, their barriers and their warp exchanges run as written, deterministically
// (in one of two orders, Schedule), and a barrier that some threads never reach is reported
// (std::runtime_error naming the kernel) instead of hanging. Blocks run one after the other; each
// has its own shared memory, filled with 0xff bytes (emulate.py rewrites `__shared__` declarations
// into block_shared() calls). Not emulated: concurrent blocks (no kernel here shares data between
// the blocks of a launch), partial warp masks (rejected), atomics, tensor cores and the GPU's
// rounding where it differs from IEEE (fast-math intrinsics, FMA contraction). Built with
// AddressSanitizer and UBSan (emulate.py, under memcheck.sh), out-of-bounds accesses to global and
// shared memory and undefined behaviour are reported.
#pragma once

#include "emulated_runtime.h"

#include <ucontext.h>

#include <algorithm>
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
#include <map>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {

constexpr int kMaxThreads = 1024;
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = size_t(512) << 10;  // AddressSanitizer's redzones widen the frames
#else
constexpr size_t kStackBytes = size_t(128) << 10;
#endif
constexpr unsigned int kFullMask = 0xffffffffu;

// Threads that wait at one barrier until all its live members are there.
struct Barrier {
  int members = 0;
  std::vector<int> waiting;
};

// The switches between the scheduler and the fibers: GCC's __builtin_setjmp (in place: it saves the
// frame, stack and resume addresses; the compiler keeps the function's values in its frame across
// it) and __builtin_longjmp, which saves no signal mask (no system call per switch) and which
// AddressSanitizer does not intercept (its longjmp hook clears the shadow of the stack being left,
// down from its top: the scheduler's, Python's deep stack, at every switch to a fiber). Neither
// instrumented nor analysed (noipa): the sanitizer's pass calls that hook before any call it knows
// not to return.
using Jump = void* [5];
[[gnu::noipa, gnu::no_sanitize_address]] inline void jump_to(Jump& to) { __builtin_longjmp(to, 1); }

// AddressSanitizer follows the switches between the scheduler's stack and the fibers': each switch is
// announced before the jump and completed after it; `fake_stack` keeps the stack's frames that
// outlive it (nullptr: it ends).
inline void start_switch([[maybe_unused]] void** fake_stack, [[maybe_unused]] const void* bottom,
                         [[maybe_unused]] size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
#endif
}
inline void finish_switch([[maybe_unused]] void* fake_stack, [[maybe_unused]] const void** from_bottom,
                          [[maybe_unused]] size_t* from_size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, from_bottom, from_size);
#endif
}

// A thread: entered once through its ucontext (its own stack), then switched to and from with Jumps.
struct Fiber {
  ucontext_t context;
  Jump jump;
  char* stack = nullptr;  // fiber_stack()
  void* fake_stack = nullptr;
  bool started = false, done = false;
  dim3 thread_idx;
};

struct Free {
  void operator()(void* p) const { std::free(p); }
};
using Memory = std::unique_ptr<unsigned char, Free>;

// Shared memory: `bytes` of its own (AddressSanitizer sees an access past them) filled with 0xff
// (NaN, -1), so that a read of what the block has not written yet shows.
inline Memory shared_memory(size_t bytes) {
  void* memory = nullptr;
  if (posix_memalign(&memory, alignof(std::max_align_t), std::max<size_t>(bytes, 1))) throw std::bad_alloc();
  std::memset(memory, 0xff, bytes);
  return Memory(static_cast<unsigned char*>(memory));
}

// The block being run, its fibers and barriers.
struct Block {
  const char* kernel;
  dim3 idx, dim, grid;
  std::vector<Fiber> fibers;
  std::deque<int> ready;  // fibers to run, in turn
  Barrier block;
  std::vector<Barrier> warps;
  std::vector<unsigned char> lanes;  // 32 slots of 16 bytes a warp: the values warp exchanges pass
  Memory dynamic_shared;
  std::map<const void*, Memory> shared_variables;  // by declaration (block_shared)
  std::function<void()> body;
  Jump scheduler;
  const void* scheduler_stack = nullptr;  // the scheduler's stack, for the switches back to it
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
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
  if (!__builtin_setjmp(self.jump)) {
    start_switch(&self.fake_stack, r.scheduler_stack, r.scheduler_stack_size);
    jump_to(r.scheduler);
  }
  finish_switch(self.fake_stack, &r.scheduler_stack, &r.scheduler_stack_size);
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
  finish_switch(nullptr, &r.scheduler_stack, &r.scheduler_stack_size);
  r.body();
  r.fibers[r.current].done = true;
  --r.block.members;
  --warp_barrier().members;
  release_if_complete(r.block);
  release_if_complete(warp_barrier());
#if defined(__SANITIZE_ADDRESS__)
  __asan_handle_no_return();  // this stack's frames end: their redzones cleared for its next fiber
#endif
  start_switch(nullptr, r.scheduler_stack, r.scheduler_stack_size);
  jump_to(r.scheduler);
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
  r.shared_variables.clear();
  r.dynamic_shared = shared_memory(shared_bytes);
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
    if (__builtin_setjmp(r.scheduler)) {  // back from the fiber: the next one
      finish_switch(r.scheduler_fake_stack, nullptr, nullptr);
      continue;
    }
    start_switch(&r.scheduler_fake_stack, f.stack, kStackBytes);
    if (f.started) jump_to(f.jump);
    f.started = true;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    setcontext(&f.context);
  }
  for (const Fiber& f : r.fibers)
    if (!f.done) throw std::runtime_error(deadlock_report(r));
}

// Thread t's stack, kept from launch to launch (launches do not nest): allocating a launch's stacks
// took most of the time of a small launch, under AddressSanitizer.
inline char* fiber_stack(long t) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (long(stacks.size()) <= t) stacks.emplace_back(new char[kStackBytes]);
  return stacks[t].get();
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
  for (long t = 0; t < threads; ++t) r.fibers[t].stack = fiber_stack(t);
  r.lanes.resize(size_t((threads + 31) / 32) * 32 * 16);
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

inline unsigned char* dynamic_shared() { return block().dynamic_shared.get(); }

// The block's `__shared__ T name;` declared at `site`: emulate.py rewrites the declaration into
// `static char name_site; auto& name = ::emu::block_shared<T>(&name_site);`, so each instance of a
// template kernel has its own site. Made when the block's first thread reaches it.
template <typename T> T& block_shared(const void* site) {
  Memory& memory = block().shared_variables[site];
  if (!memory) memory = shared_memory(sizeof(T));
  return *reinterpret_cast<T*>(memory.get());
}

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
