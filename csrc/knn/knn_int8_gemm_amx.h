// The certified search's int8 GEMM on Intel AMX tiles (knn_certified_stage1_cpu.h), where the CPU
// has AMX-INT8 and Linux grants the tile state. torch's at::_int_mm (oneDNN's int8 GEMM API) ran
// at ~1.2 TOP/s a core on the Xeon of the README's tables, where a 1,024^2 x 768 tile of this
// kernel runs at ~4.7 (docs/certified_knn.md, "The int8 GEMM"). Both give the exact int32 sums
// (D 127^2 < 2^31, so no sum wraps), so the results do not depend on which one ran.
//
// A tile multiply (TDPBSSD) adds a 16 x 64 int8 tile of one side times a 64 x 16 tile of the other
// into a 16 x 16 int32 tile. The row side is read where it lies (16 rows of 64 bytes, any stride);
// the column side is packed into AMX's layout, where a tile line holds 16 columns x 4 consecutive k
// (per GEMM, or once per call: AmxColumnPanels). Each 32 x 32 output block keeps 2 x 2 accumulator
// tiles over the whole K.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "knn_cpu_isa.h"

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define DPM_OPS_AMX_BUILD 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DPM_OPS_AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl")))
#endif

namespace dpm_ops::knn {

constexpr int64_t kAmxK = 64;       // int8 k per tile multiply: rows of the int8 operands are padded to it
constexpr int64_t kAmxBlock = 32;   // output rows / columns per block of 2 x 2 accumulator tiles

// Whether this process can run AMX int8 tile multiplies: the CPU reports AMX-TILE and AMX-INT8
// (CPUID leaf 7), Linux grants the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once) and
// the AVX-512 build runs (has_avx512: so that ATEN_CPU_CAPABILITY=avx2 or default also tests the
// other path, as for stage 1's loops).
inline bool amx_int8_supported() {
#ifdef DPM_OPS_AMX_BUILD
  static const bool supported = [] {
    if (!has_avx512()) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return tile && int8 && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return supported;
#else
  return false;
#endif
}

// Whether the int8 GEMM runs on AMX tiles now: where supported and the environment does not say
// DPM_OPS_AMX=0 (read at each GEMM, so that a process can time or test both; at::_int_mm runs it
// otherwise).
inline bool amx_int8_usable() {
  if (!amx_int8_supported()) return false;
  const char* choice = std::getenv("DPM_OPS_AMX");
  return choice == nullptr || std::strcmp(choice, "0") != 0;
}

// Whether at::_int_mm gives exact int32 sums in this process, where stage 1 runs on it. torch runs it on
// oneDNN, and oneDNN held below VNNI (ONEDNN_MAX_CPU_ISA=AVX2 or AVX512_CORE, a common tuning setting) runs
// kernels whose sums are not exact (random +-127 levels came out off by thousands: wrong neighbours, bounds
// that did not hold). Probed once per setting of torch's mkldnn switch (off, torch's own loop is exact), on
// random levels at the layout stage 1 passes (the column side transposed).
inline bool int_mm_exact() {
  static std::atomic<int> known[2] = {-1, -1};
  std::atomic<int>& state = known[at::globalContext().userEnabledMkldnn() ? 1 : 0];
  if (state.load() < 0) {
    constexpr int64_t kRows = 64, kDepth = 128;
    at::Tensor a = at::empty({kRows, kDepth}, at::kChar), b = at::empty({kRows, kDepth}, at::kChar);
    int8_t *pa = a.data_ptr<int8_t>(), *pb = b.data_ptr<int8_t>();
    uint32_t seed = 12345;  // a linear congruential generator's top bytes, -127..127
    const auto level = [&seed] { return seed = seed * 1664525u + 1013904223u, int8_t(int(seed >> 24) % 255 - 127); };
    for (int64_t i = 0; i < kRows * kDepth; ++i) pa[i] = level(), pb[i] = level();
    const at::Tensor got = at::_int_mm(a, b.t()).contiguous();
    const int32_t* g = got.const_data_ptr<int32_t>();
    bool exact = true;
    for (int64_t r = 0; r < kRows && exact; ++r)
      for (int64_t c = 0; c < kRows && exact; ++c) {
        int32_t dot = 0;
        for (int64_t t = 0; t < kDepth; ++t) dot += int32_t(pa[r * kDepth + t]) * int32_t(pb[c * kDepth + t]);
        exact = g[r * kRows + c] == dot;
      }
    state.store(exact ? 1 : 0);
  }
  return state.load() == 1;
}

#ifdef DPM_OPS_AMX_BUILD
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};
// Eight tiles of 16 rows x 64 bytes: 0-3 accumulators, 4-5 the row side, 6-7 the column side. A
// constant in memory: GCC 12 drops the stores to a local config before LDTILECFG.
inline constexpr TileConfig kConfig = [] {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.bytes_per_row[t] = 64, c.rows[t] = 16;
  return c;
}();

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: the intrinsics' _mm512_undefined_*
// The rows [0, nc) of `b` (`width` int8 each, a multiple of 64) as columns in AMX's layout: per group
// of 16 columns and step of 64 k, 16 lines (one per 4 consecutive k) of 16 columns x 4 bytes. Columns
// past nc, up to a multiple of 32, are zero. Each 16 x 64-byte block is a 16 x 16 transpose of 4-byte
// words: within each 128-bit lane (unpacks), then of the lanes (shuffles).
DPM_OPS_AMX_TARGET inline void pack_columns(const int8_t* b, int64_t nc, int64_t width, int8_t* packed) {
  const int64_t groups = (nc + kAmxBlock - 1) / kAmxBlock * (kAmxBlock / 16), steps = width / kAmxK;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t s = 0; s < steps; ++s) {
      __m512i r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t col = g * 16 + j;
        r[j] = col < nc ? _mm512_loadu_si512(b + col * width + s * kAmxK) : _mm512_setzero_si512();
      }
      __m512i v[16];  // v[4 a + i]: per lane L, word 4 L + i of rows 4 a .. 4 a + 3
      for (int a = 0; a < 4; ++a) {
        const __m512i t0 = _mm512_unpacklo_epi32(r[4 * a], r[4 * a + 1]);
        const __m512i t1 = _mm512_unpackhi_epi32(r[4 * a], r[4 * a + 1]);
        const __m512i t2 = _mm512_unpacklo_epi32(r[4 * a + 2], r[4 * a + 3]);
        const __m512i t3 = _mm512_unpackhi_epi32(r[4 * a + 2], r[4 * a + 3]);
        v[4 * a] = _mm512_unpacklo_epi64(t0, t2);
        v[4 * a + 1] = _mm512_unpackhi_epi64(t0, t2);
        v[4 * a + 2] = _mm512_unpacklo_epi64(t1, t3);
        v[4 * a + 3] = _mm512_unpackhi_epi64(t1, t3);
      }
      int8_t* out = packed + (g * steps + s) * 1024;
      for (int i = 0; i < 4; ++i) {
        const __m512i x0 = _mm512_shuffle_i32x4(v[i], v[4 + i], 0x44), x1 = _mm512_shuffle_i32x4(v[i], v[4 + i], 0xEE);
        const __m512i x2 = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0x44);
        const __m512i x3 = _mm512_shuffle_i32x4(v[8 + i], v[12 + i], 0xEE);
        _mm512_store_si512(out + (0 + i) * 64, _mm512_shuffle_i32x4(x0, x2, 0x88));   // words 0 .. 3
        _mm512_store_si512(out + (4 + i) * 64, _mm512_shuffle_i32x4(x0, x2, 0xDD));   // words 4 .. 7
        _mm512_store_si512(out + (8 + i) * 64, _mm512_shuffle_i32x4(x1, x3, 0x88));   // words 8 .. 11
        _mm512_store_si512(out + (12 + i) * 64, _mm512_shuffle_i32x4(x1, x3, 0xDD));  // words 12 .. 15
      }
    }
}

#pragma GCC diagnostic pop

// c (32 rows, ldc int32 apart) = 32 rows of `a` (lda bytes apart) times `groups` packed column
// groups (a multiple of 2), over `steps` steps of 64 k.
DPM_OPS_AMX_TARGET inline void block_row(const int8_t* a, int64_t lda, const int8_t* packed, int64_t groups,
                                         int64_t steps, int32_t* c, int64_t ldc) {
  const int64_t group_bytes = steps * 1024, stride = ldc * int64_t(sizeof(int32_t));
  for (int64_t g = 0; g < groups; g += 2) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int8_t* b0 = packed + g * group_bytes;
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(4, a + s * kAmxK, lda);
      _tile_loadd(5, a + 16 * lda + s * kAmxK, lda);
      _tile_loadd(6, b0 + s * 1024, 64);
      _tile_loadd(7, b0 + group_bytes + s * 1024, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
    int32_t* out = c + g * 16;
    _tile_stored(0, out, stride);
    _tile_stored(1, out + 16, stride);
    _tile_stored(2, out + 16 * ldc, stride);
    _tile_stored(3, out + 16 * ldc + 16, stride);
  }
}

// Loads this kernel's tile configuration, saving the thread's current one: torch's and oneDNN's AMX
// kernels may keep theirs loaded between calls and skip reloading it.
DPM_OPS_AMX_TARGET inline void load_config(TileConfig& saved) {
  _tile_storeconfig(&saved);
  _tile_loadconfig(&kConfig);
}
// Restores the saved configuration, or releases the tiles where none was loaded (palette 0).
DPM_OPS_AMX_TARGET inline void restore_config(const TileConfig& saved) {
  asm volatile("" ::: "memory");  // the saved bytes were written by STTILECFG: keep them read here
  if (saved.palette != 0) _tile_loadconfig(&saved);
  else _tile_release();
}

}  // namespace amx
#endif

// One thread's AMX int8 GEMM and its buffers (64-byte aligned: split-line tile loads ran at a third
// of the speed). The operands are int8 rows `width` bytes apart (a multiple of 64, 64-byte aligned):
// pack() takes the column side, then block() multiplies up to 32 rows of the row side with it.
class AmxInt8Gemm {
 public:
  static int64_t round_up(int64_t n) { return (n + kAmxBlock - 1) / kAmxBlock * kAmxBlock; }

  // The rows [0, nc) of b become the columns of the next products.
  void pack(const int8_t* b, int64_t nc, int64_t width) {
#ifdef DPM_OPS_AMX_BUILD
    reserve(packed_, round_up(nc) * width);
    amx::pack_columns(b, nc, width, packed_.data_ptr<int8_t>());
    use(packed_.const_data_ptr<int8_t>(), nc, width);
#else
    TORCH_CHECK(false, "AmxInt8Gemm: this build has no AMX code");
#endif
  }
  // Columns packed elsewhere (AmxColumnPanels) become the columns of the next products.
  void use(const int8_t* packed, int64_t nc, int64_t width) { columns_ = packed, cols_ = nc, width_ = width; }

  // out (rows x round_up(nc), row stride round_up(nc)) = the rows [0, rows) of a (rows <= 32) times the
  // packed columns, transposed; out holds 32 rows.
  void block(const int8_t* a, int64_t rows, int32_t* out) {
#ifdef DPM_OPS_AMX_BUILD
    if (rows < kAmxBlock) {  // zero-padded to a whole block
      reserve(edge_rows_, kAmxBlock * width_);
      int8_t* edge = edge_rows_.data_ptr<int8_t>();
      std::memcpy(edge, a, rows * width_);
      std::memset(edge + rows * width_, 0, (kAmxBlock - rows) * width_);
      a = edge;
    }
    amx::TileConfig saved;
    amx::load_config(saved);
    amx::block_row(a, width_, columns_, round_up(cols_) / 16, width_ / kAmxK, out, round_up(cols_));
    amx::restore_config(saved);
#else
    TORCH_CHECK(false, "AmxInt8Gemm: this build has no AMX code");
#endif
  }

  // out (nr x nc, row-major, stride nc) = the rows [0, nr) of a times the nc columns of pack() / use().
  // `out` must hold round_up(nr) x round_up(nc) values (the blocks are computed whole).
  void run(const int8_t* a, int64_t nr, int32_t* out) {
    const int64_t cols = round_up(cols_);
    for (int64_t r = 0; r < nr; r += kAmxBlock) block(a + r * width_, std::min(kAmxBlock, nr - r), out + r * cols);
    if (cols != cols_)  // to stride nc; rows only move down, so in order
      for (int64_t r = 1; r < nr; ++r) std::memmove(out + r * cols_, out + r * cols, cols_ * sizeof(int32_t));
  }

 private:
  static void reserve(at::Tensor& buffer, int64_t bytes) {
    if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::kChar);
  }
  at::Tensor packed_, edge_rows_;
  const int8_t* columns_ = nullptr;
  int64_t cols_ = 0, width_ = 0;
};

// The column side of a call's GEMMs packed once, where AmxInt8Gemm::pack would repack a column range
// for every row block that meets it: the row ranges [edges[i], edges[i + 1]) of int8 rows `width`
// bytes apart, each as pack() lays it out.
class AmxColumnPanels {
 public:
  AmxColumnPanels(const int8_t* rows, int64_t width, std::vector<int64_t> edges)
      : edges_(std::move(edges)), offsets_(edges_.size(), 0) {
#ifdef DPM_OPS_AMX_BUILD
    for (size_t i = 1; i < edges_.size(); ++i)
      offsets_[i] = offsets_[i - 1] + AmxInt8Gemm::round_up(edges_[i] - edges_[i - 1]) * width;
    panels_ = at::empty({offsets_.back()}, at::kChar);
    int8_t* panels = panels_.data_ptr<int8_t>();
    at::parallel_for(0, int64_t(edges_.size()) - 1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        amx::pack_columns(rows + edges_[i] * width, edges_[i + 1] - edges_[i], width, panels + offsets_[i]);
    });
#else
    TORCH_CHECK(false, "AmxColumnPanels: this build has no AMX code");
#endif
  }
  // The panel of the range that starts at row `begin` (one of the edges).
  const int8_t* panel(int64_t begin) const {
    const auto at = std::lower_bound(edges_.begin(), edges_.end(), begin);
    TORCH_CHECK(at != edges_.end() && *at == begin, "AmxColumnPanels: no range starts at ", begin);
    return panels_.const_data_ptr<int8_t>() + offsets_[at - edges_.begin()];
  }

 private:
  std::vector<int64_t> edges_, offsets_;
  at::Tensor panels_;
};

}  // namespace dpm_ops::knn
