// Stage 1 of the CPU certified search (knn_certified_cpu.cpp): the rows quantised to int8 with one
// scale per row, an exact int32 GEMM of the quantised rows (AMX tiles where the CPU has them,
// knn_int8_gemm_amx.h; else at::_int_mm, oneDNN: AVX-512 VNNI where present, ~2x a bf16 GEMM and ~4x
// fp32), and per-pair distance bounds from each row's measured quantisation residual (derivation:
// docs/certified_knn.md, "The bound").
//
// With x~ = s_x q_x (q_x = round(x / s_x) in [-127, 127]) and e_x = x - x~, for every pair
//   |x.y - x~.y~| = |e_x.y + x~.e_y| <= |e_x| |y| + (|x| + |e_x|) |e_y|              (Cauchy-Schwarz)
// q_x.q_y is exact in int32 (D 127^2 < 2^31). The estimate s = (s_x s_y) q_x.q_y in the compute type
// adds three roundings (below 4 2^-24 |x~| |y~| <= 16 2^-24 |x| |y| as |e| <= |x|), and the direct
// path's own dot product p is within gamma_D |x| |y| of x.y, so with n >= |x|, r >= |e_x| per row
//   |s - p| <= E = n_x (r_y + g' n_y) + r_x (n_y + r_y) + tau,   g' = gamma_D + 2^-19,
// where 2^-19 = 32 2^-24 also covers the rounding of E itself and of s +- E (each below 2^-24
// (|s| + E)), and tau = D min_normal 2^18 the absolute errors of underflow (flushed products: below
// D 2^14 min_normal). L = pair_distance(s + E) <= d <= U = pair_distance(s - E) then follows as
// for any monotone formula (knn_certified_cpu.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "knn_cpu_isa.h"
#include "knn_int8_gemm_amx.h"
#include "knn_math.h"
#include "knn_operands.h"

namespace dpm_ops::knn {

constexpr int64_t kMaxInt8Dim = 133000;                          // D 127^2 < 2^31: exact int32 sums
constexpr double kMaxCertifiedNorm = 1.152921504606846976e18;    // 2^60: n^2 and E stay finite in fp32
constexpr int64_t kHitBlock = 64;                                // hit flags packed into one word

// `v` rounded to A upwards, so a bound computed in double stays a bound.
template <typename A> A round_up(double v) {
  const A a = static_cast<A>(v);
  return static_cast<double>(a) < v ? std::nextafter(a, std::numeric_limits<A>::infinity()) : a;
}

// One row x (D) quantised to q = round(x / s) in [-127, 127] with s = max|x| / 127 rounded to A; also
// |x|^2 and |x - s q|^2, summed in double (in lanes, so that the loops vectorise).
template <typename A> struct QuantisedRow {
  A scale;
  double norm2, residual2;
};
// 1 / scale, at most `largest` (A's largest finite value): a row whose largest magnitude lies below
// 127 / largest (3.7e-37 in fp32) had an infinite inverse, its zeros quantised to NaN, and its measured
// residual past its norm sent the whole call to the direct path. Any inverse is sound: the residual is measured.
inline double inverse_scale(double scale, double largest) { return scale > 0 ? std::min(1 / scale, largest) : 0; }

template <typename A>
[[gnu::always_inline]] inline QuantisedRow<A> quantise_row_body(const A* __restrict x, int64_t D,
                                                                int8_t* __restrict q) {
  // The largest magnitude (exact in A), in as many lanes as one AVX-512 register holds.
  constexpr int kLanes = 64 / sizeof(A);
  A top[kLanes] = {};
  int64_t t = 0;
  for (; t + kLanes <= D; t += kLanes)
    for (int l = 0; l < kLanes; ++l) top[l] = std::max(top[l], std::abs(x[t + l]));
  A largest = 0;
  for (; t < D; ++t) largest = std::max(largest, std::abs(x[t]));
  for (int l = 0; l < kLanes; ++l) largest = std::max(largest, top[l]);
  // q is rounded against the scale the estimate uses, in A; any level is sound (the residual is
  // measured), so the division may be a multiplication, and in A. The levels and the sums are
  // separate loops so that both vectorise.
  const A sr = A(double(largest) / 127);
  const A inverse = A(inverse_scale(double(sr), double(std::numeric_limits<A>::max())));
  for (t = 0; t < D; ++t) q[t] = int8_t(std::min(A(127), std::max(A(-127), std::nearbyint(x[t] * inverse))));
  constexpr int kSumLanes = 8;
  double norm2[kSumLanes] = {}, residual2[kSumLanes] = {};
  const auto add = [&](int64_t t, double& n2, double& e2) {
    const double v = double(x[t]), e = v - double(sr) * double(int32_t(q[t]));
    n2 += v * v;
    e2 += e * e;
  };
  for (t = 0; t + kSumLanes <= D; t += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) add(t + l, norm2[l], residual2[l]);
  double n2 = 0, e2 = 0;
  for (; t < D; ++t) add(t, n2, e2);
  for (int l = 0; l < kSumLanes; ++l) n2 += norm2[l], e2 += residual2[l];
  return {sr, n2, e2};
}
template <typename A> QuantisedRow<A> quantise_row_portable(const A* x, int64_t D, int8_t* q) {
  return quantise_row_body(x, D, q);
}
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: the intrinsics' _mm512_undefined_*
#pragma GCC diagnostic ignored "-Wuninitialized"
// The fp32 rows' AVX-512 build, written out: GCC does not vectorise the body's lane loops (it keeps
// the maxima and the int8 to double conversions scalar, 2 ns an element). The same arithmetic per
// element: the maximum, the levels rounded to nearest even in fp32, and e = x - s q exactly in double
// (s q has at most 31 significant bits and lies within a level of x); only the sums' order differs.
DPM_OPS_AVX512_TARGET inline QuantisedRow<float> quantise_row_fp32_avx512(const float* x, int64_t D, int8_t* q) {
  const auto tail = [&](int64_t t) { return __mmask16(D - t >= 16 ? 0xFFFF : (1u << (D - t)) - 1); };
  __m512 top = _mm512_setzero_ps();
  for (int64_t t = 0; t < D; t += 16) top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail(t), x + t)));
  const float sr = float(double(_mm512_reduce_max_ps(top)) / 127);
  const __m512 inverse = _mm512_set1_ps(float(inverse_scale(sr, std::numeric_limits<float>::max())));
  const __m512d scale = _mm512_set1_pd(sr);
  __m512d norm2 = _mm512_setzero_pd(), residual2 = _mm512_setzero_pd();
  for (int64_t t = 0; t < D; t += 16) {
    const __mmask16 mask = tail(t);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + t);
    const __m512 level = _mm512_min_ps(
        _mm512_set1_ps(127.0f),
        _mm512_max_ps(_mm512_set1_ps(-127.0f),
                      _mm512_roundscale_ps(_mm512_mul_ps(v, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    _mm_mask_storeu_epi8(q + t, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(level)));
    for (const int half : {0, 1}) {
      const __m512d vd = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(v, 1) : _mm512_castps512_ps256(v));
      const __m512d ld = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(level, 1) : _mm512_castps512_ps256(level));
      const __m512d e = _mm512_fnmadd_pd(scale, ld, vd);
      norm2 = _mm512_fmadd_pd(vd, vd, norm2);
      residual2 = _mm512_fmadd_pd(e, e, residual2);
    }
  }
  return {sr, _mm512_reduce_add_pd(norm2), _mm512_reduce_add_pd(residual2)};
}
#endif
template <typename A> DPM_OPS_AVX512_TARGET QuantisedRow<A> quantise_row_avx512(const A* x, int64_t D, int8_t* q) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<A, float>) return quantise_row_fp32_avx512(x, D, q);
#endif
  return quantise_row_body(x, D, q);
}
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
template <typename A> QuantisedRow<A> quantise_row(const A* x, int64_t D, int8_t* q) {
  return has_avx512() ? quantise_row_avx512(x, D, q) : quantise_row_portable(x, D, q);
}

// The int8 rows and per-row factors of stage 1, in the compute type A.
template <typename A> struct Stage1Rows {
  at::Tensor q;          // (rows, max(D, 2)) int8
  at::Tensor scale;      // s: the estimate of row x is s q exactly
  at::Tensor norm;       // n >= |x|
  at::Tensor residual;   // r >= |x - s q|
  at::Tensor norm_term;  // >= r + g' n (the factor of the other row's n in E)
  at::Tensor sum_term;   // >= n + r (the factor of the other row's r in E)
  A tau = A(0);          // E's absolute term

  // The stage-1 rows of xs, or nothing when the bound does not apply (D too long for exact int32
  // sums, a norm above 2^60 or not finite): the caller then runs the direct path.
  static std::optional<Stage1Rows> make(const Operand& xs) {
    const int64_t N = xs.rows.size(0), D = xs.rows.size(1);
    if (D > kMaxInt8Dim || !(amx_int8_usable() || int_mm_exact())) return std::nullopt;
    const double gamma = D * std::ldexp(1.0, -24) / (1 - D * std::ldexp(1.0, -24));
    const double g = gamma + std::ldexp(1.0, -19);
    Stage1Rows s;
    const at::TensorOptions options = xs.rows.options();
    // Rows padded with zero columns to a multiple of 64 bytes (AMX's k step; zeros change no dot
    // product). This also keeps at::_int_mm off an inner size of 1, for which it returns garbage
    // (torch 2.13).
    const int64_t width = (std::max<int64_t>(D, 1) + kAmxK - 1) / kAmxK * kAmxK;
    s.q = width == D ? at::empty({N, D}, options.dtype(at::kChar)) : at::zeros({N, width}, options.dtype(at::kChar));
    for (at::Tensor* t : {&s.scale, &s.norm, &s.residual, &s.norm_term, &s.sum_term}) *t = at::empty({N}, options);
    s.tau = A(D * std::ldexp(double(std::numeric_limits<A>::min()), 18));
    const A* rows = xs.rows.const_data_ptr<A>();
    int8_t* q = s.q.data_ptr<int8_t>();
    A *scale = s.scale.data_ptr<A>(), *norm = s.norm.data_ptr<A>(), *residual = s.residual.data_ptr<A>();
    A *norm_term = s.norm_term.data_ptr<A>(), *sum_term = s.sum_term.data_ptr<A>();
    std::atomic<bool> usable{true};
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const QuantisedRow<A> row = quantise_row(rows + r * D, D, q + r * width);
        const A sr = row.scale;
        const double norm2 = row.norm2, residual2 = row.residual2;
        // Double rounding of the sums and of e (D <= 133,000 terms): below 2^-30 relative, 2^-48 |x| absolute.
        const double n = std::sqrt(norm2) * (1 + std::ldexp(1.0, -30));
        const double e = std::sqrt(residual2) * (1 + std::ldexp(1.0, -30)) + std::ldexp(n, -48);
        if (!(n <= kMaxCertifiedNorm) || !(e <= n)) usable = false;
        scale[r] = sr;
        norm[r] = round_up<A>(n);
        residual[r] = round_up<A>(e);
        norm_term[r] = round_up<A>((e + g * n) * (1 + std::ldexp(1.0, -50)));
        sum_term[r] = round_up<A>((n + e) * (1 + std::ldexp(1.0, -50)));
      }
    });
    if (!usable) return std::nullopt;
    return s;
  }

  // The rows as AMX's column side, packed once in the ranges [edges[i], edges[i + 1]) (edges ends with
  // the row count); nothing where the GEMM does not run on AMX.
  std::optional<AmxColumnPanels> column_panels(std::vector<int64_t> edges) const {
    if (!amx_int8_usable()) return std::nullopt;
    return AmxColumnPanels(q.template const_data_ptr<int8_t>(), q.size(1), std::move(edges));
  }

  // The rows `ids` (int64) only.
  Stage1Rows take(const at::Tensor& ids) const {
    Stage1Rows s = *this;
    for (at::Tensor* t : {&s.q, &s.scale, &s.norm, &s.residual, &s.norm_term, &s.sum_term})
      *t = t->index_select(0, ids);
    return s;
  }
};

// One line of a stage-1 tile: row `row` of x against columns [0, cols) of y. Inputs: the int32 dots
// of the quantised rows, both sides' factors, and the limits the hits are tested against (the row's
// own, and with column hits each column's own as a row of the same lists). Outputs: the bounds and,
// per column, whether the row wants it (row_hits) and whether the column's row wants this row
// (col_hits): lower <= limit or upper >= top, one byte each, then packed into words of kHitBlock bits
// (row_words, col_words) for for_each_hit. Limits only fall and tops only rise while a line is
// offered, so the hits are a superset of what is still wanted when an item is reached.
template <typename A> struct Stage1Line {
  const int32_t* dots;
  int64_t cols;
  Metric metric;
  A tau;
  A row_scale, row_norm, row_residual, row_sq_norm, row_limit, row_top;
  const A *col_scale, *col_norm_term, *col_sum_term, *col_sq_norm, *col_limit, *col_top;
  A *lower, *upper;
  uint8_t *row_hits, *col_hits;
  uint64_t *row_words, *col_words;

  // The same line from column `skip` on (a multiple of kHitBlock, so that the packed words stay
  // aligned): the part of a diagonal tile's line that is offered.
  Stage1Line from(int64_t skip) const {
    Stage1Line part = *this;
    part.dots += skip;
    part.cols -= skip;
    for (const A** column : {&part.col_scale, &part.col_norm_term, &part.col_sum_term, &part.col_sq_norm,
                             &part.col_limit, &part.col_top})
      if (*column) *column += skip;
    part.lower += skip, part.upper += skip, part.row_hits += skip, part.col_hits += skip;
    part.row_words += skip / kHitBlock, part.col_words += skip / kHitBlock;
    return part;
  }
};

// Per-thread buffers of stage 1: a tile's int32 GEMM, one line's bounds and hits (bytes padded to
// kHitBlock, and packed).
template <typename A> struct Stage1Scratch {
  at::Tensor tile;
  std::vector<A> lower, upper;
  std::vector<uint8_t> row_hits, col_hits;
  std::vector<uint64_t> row_words, col_words;
  std::vector<A> smallest;  // mth_smallest's buffer
  AmxInt8Gemm amx;
  Stage1Scratch(int64_t tile_rows, int64_t tile_cols)
      : tile(at::empty({AmxInt8Gemm::round_up(tile_rows) * AmxInt8Gemm::round_up(tile_cols)}, at::kInt)),
        lower(tile_cols), upper(tile_cols),
        row_hits(tile_cols / kHitBlock * kHitBlock + kHitBlock), col_hits(row_hits.size()),
        row_words(row_hits.size() / kHitBlock), col_words(row_words.size()) {}

  // The exact int32 dots of x's rows [r0, r0 + nr) and y's rows [c0, c0 + nc), (nr, nc) row-major:
  // on AMX tiles where amx_int8_usable(), else by at::_int_mm. `panels`, where given, hold y's
  // columns packed for AMX, with a range starting at c0.
  const int32_t* gemm(const Stage1Rows<A>& x, int64_t r0, int64_t nr, const Stage1Rows<A>& y, int64_t c0,
                      int64_t nc, const AmxColumnPanels* panels = nullptr) {
    if (amx_int8_usable()) {
      use_columns(y, c0, nc, panels);
      amx.run(x.q.template const_data_ptr<int8_t>() + r0 * x.q.size(1), nr, tile.data_ptr<int32_t>());
      return tile.const_data_ptr<int32_t>();
    }
    at::Tensor out = tile.narrow(0, 0, nr * nc).view({nr, nc});
    at::_int_mm_out(out, x.q.narrow(0, r0, nr), y.q.narrow(0, c0, nc).t());
    return out.const_data_ptr<int32_t>();
  }

  // The same tile for reading a row at a time, in order (dots(r), r = 0, 1, ...): on AMX each block of
  // 32 rows is computed when its first row is asked for, so that its dots (128 KB for 1,024 columns)
  // are still in the core's cache when its lines read them; elsewhere the tile at once. `panels` as
  // for gemm().
  void begin_tile(const Stage1Rows<A>& x, int64_t r0, int64_t nr, const Stage1Rows<A>& y, int64_t c0, int64_t nc,
                  const AmxColumnPanels* panels) {
    tile_rows_ = nr, tile_cols_ = nc, block_begin_ = -1;
    if (!amx_int8_usable()) {
      whole_tile_ = gemm(x, r0, nr, y, c0, nc);
      return;
    }
    whole_tile_ = nullptr;
    row_width_ = x.q.size(1);
    row_side_ = x.q.template const_data_ptr<int8_t>() + r0 * row_width_;
    use_columns(y, c0, nc, panels);
  }
  const int32_t* dots(int64_t r) {
    if (whole_tile_ != nullptr) return whole_tile_ + r * tile_cols_;
    if (block_begin_ < 0 || r < block_begin_ || r >= block_begin_ + kAmxBlock) {
      block_begin_ = r / kAmxBlock * kAmxBlock;
      amx.block(row_side_ + block_begin_ * row_width_, std::min(kAmxBlock, tile_rows_ - block_begin_),
                tile.data_ptr<int32_t>());
    }
    return tile.const_data_ptr<int32_t>() + (r - block_begin_) * AmxInt8Gemm::round_up(tile_cols_);
  }

  // The line of x's row `row` (squared norm x_sq_norm) against y's columns [c0, c0 + cols), with the
  // row's limit and top; the caller adds the column limits for column hits.
  Stage1Line<A> line(const int32_t* dots, int64_t cols, Metric metric, const Stage1Rows<A>& x, int64_t row,
                     A x_sq_norm, const Stage1Rows<A>& y, int64_t c0, const A* y_sq_norms, A limit, A top) {
    return {dots, cols, metric, x.tau,
            x.scale.template const_data_ptr<A>()[row], x.norm.template const_data_ptr<A>()[row],
            x.residual.template const_data_ptr<A>()[row], x_sq_norm, limit, top,
            y.scale.template const_data_ptr<A>() + c0, y.norm_term.template const_data_ptr<A>() + c0,
            y.sum_term.template const_data_ptr<A>() + c0, y_sq_norms + c0, nullptr, nullptr,
            lower.data(), upper.data(), row_hits.data(), col_hits.data(), row_words.data(), col_words.data()};
  }

 private:
  // y's rows [c0, c0 + nc) as AMX's columns for the next products: from `panels` where given, else
  // packed here.
  void use_columns(const Stage1Rows<A>& y, int64_t c0, int64_t nc, const AmxColumnPanels* panels) {
    const int64_t width = y.q.size(1);
    if (panels != nullptr) amx.use(panels->panel(c0), nc, width);
    else amx.pack(y.q.template const_data_ptr<int8_t>() + c0 * width, nc, width);
  }

  const int32_t* whole_tile_ = nullptr;  // begin_tile's tile when computed at once
  const int8_t* row_side_ = nullptr;     // else its rows, by blocks
  int64_t tile_rows_ = 0, tile_cols_ = 0, row_width_ = 0, block_begin_ = -1;
};

// The per-pair loop; restrict parameters, so that the byte stores (which may alias anything) do not
// stop it from vectorising.
template <Metric kMetric, bool kColumns, typename A>
[[gnu::always_inline]] inline void stage1_line_loop(
    int64_t cols, const int32_t* __restrict dots, const A* __restrict scale, const A* __restrict norm_term,
    const A* __restrict sum_term, const A* __restrict sq_norm, const A* __restrict col_limit,
    const A* __restrict col_top, A* __restrict lower, A* __restrict upper, uint8_t* __restrict row_hits,
    uint8_t* __restrict col_hits, A sr, A nr, A er, A xn, A limit, A top, A tau) {
  for (int64_t c = 0; c < cols; ++c) {
    const A dot = (sr * scale[c]) * A(dots[c]);
    const A e = nr * norm_term[c] + (er * sum_term[c] + tau);
    const A lo = pair_distance(dot + e, xn, sq_norm[c], kMetric);
    const A up = pair_distance(dot - e, xn, sq_norm[c], kMetric);
    lower[c] = lo;
    upper[c] = up;
    row_hits[c] = uint8_t((lo <= limit) | (up >= top));
    if constexpr (kColumns) col_hits[c] = uint8_t((lo <= col_limit[c]) | (up >= col_top[c]));
  }
}

template <Metric kMetric, bool kColumns, typename A>
[[gnu::always_inline]] inline void stage1_line_body(const Stage1Line<A>& in) {
  stage1_line_loop<kMetric, kColumns>(in.cols, in.dots, in.col_scale, in.col_norm_term, in.col_sum_term,
                                      in.col_sq_norm, in.col_limit, in.col_top, in.lower, in.upper, in.row_hits,
                                      in.col_hits, in.row_scale, in.row_norm, in.row_residual, in.row_sq_norm,
                                      in.row_limit, in.row_top, in.tau);
}

template <bool kColumns, typename A> void stage1_line_portable(const Stage1Line<A>& in) {
  switch (in.metric) {
    case Metric::kCosine: return stage1_line_body<Metric::kCosine, kColumns>(in);
    case Metric::kSqEuclidean: return stage1_line_body<Metric::kSqEuclidean, kColumns>(in);
    case Metric::kEuclidean: return stage1_line_body<Metric::kEuclidean, kColumns>(in);
  }
}

template <bool kColumns, typename A> DPM_OPS_AVX512_TARGET void stage1_line_avx512(const Stage1Line<A>& in) {
  switch (in.metric) {
    case Metric::kCosine: return stage1_line_body<Metric::kCosine, kColumns>(in);
    case Metric::kSqEuclidean: return stage1_line_body<Metric::kSqEuclidean, kColumns>(in);
    case Metric::kEuclidean: return stage1_line_body<Metric::kEuclidean, kColumns>(in);
  }
}

// Clears the hit flags past `cols` up to a multiple of kHitBlock, which pack_hits reads at a time.
template <bool kColumns> void clear_hit_padding(int64_t cols, uint8_t* row_hits, uint8_t* col_hits) {
  const int64_t padded = (cols + kHitBlock - 1) / kHitBlock * kHitBlock;
  std::memset(row_hits + cols, 0, padded - cols);
  if constexpr (kColumns) std::memset(col_hits + cols, 0, padded - cols);
}

// Packs hit flags (bytes 0 / 1) [0, cols) into words of kHitBlock bits (flag c at bit c % kHitBlock of
// word c / kHitBlock), zero past cols: for_each_hit then skips a block of flags with one test. The
// AVX-512 build tests 64 bytes an instruction; the portable one gathers eight flags with a multiply
// (byte i's low bit lands at bit 56 + i, and no two terms overlap or carry into the top byte).
inline void pack_hits_portable(const uint8_t* flags, int64_t words, uint64_t* out) {
  for (int64_t w = 0; w < words; ++w) {
    uint64_t word = 0;
    for (int b = 0; b < kHitBlock; b += 8) {
      uint64_t eight;
      std::memcpy(&eight, flags + w * kHitBlock + b, 8);
      word |= ((eight * 0x0102040810204080ull) >> 56) << b;
    }
    out[w] = word;
  }
}
#if defined(__x86_64__) && defined(__GNUC__)
DPM_OPS_AVX512_TARGET inline void pack_hits_avx512(const uint8_t* flags, int64_t words, uint64_t* out) {
  for (int64_t w = 0; w < words; ++w) {
    const __m512i block = _mm512_loadu_si512(flags + w * kHitBlock);
    out[w] = _mm512_test_epi8_mask(block, block);
  }
}
#else
inline void pack_hits_avx512(const uint8_t* flags, int64_t words, uint64_t* out) {
  pack_hits_portable(flags, words, out);
}
#endif
// Both lines' flags packed (see above), the AVX-512 build where the CPU has it.
template <bool kColumns>
void pack_hits(int64_t cols, uint8_t* row_hits, uint8_t* col_hits, uint64_t* row_words, uint64_t* col_words) {
  clear_hit_padding<kColumns>(cols, row_hits, col_hits);
  const int64_t words = (cols + kHitBlock - 1) / kHitBlock;
  const auto pack = has_avx512() ? pack_hits_avx512 : pack_hits_portable;
  pack(row_hits, words, row_words);
  if constexpr (kColumns) pack(col_hits, words, col_words);
}

// Bounds and hits of one line (see Stage1Line), packed for for_each_hit.
template <bool kColumns, typename A> void stage1_line(const Stage1Line<A>& in) {
  if (has_avx512()) stage1_line_avx512<kColumns>(in);
  else stage1_line_portable<kColumns>(in);
  pack_hits<kColumns>(in.cols, in.row_hits, in.col_hits, in.row_words, in.col_words);
}

// One line of a tile whose GEMM is in the compute type (the exact cross block): the distances from
// the line's dot products, written to `out`, and their hits as stage1_line's (lower = upper = the
// distance), packed likewise. One pass, so the line is scanned while it is in L1.
template <typename A> struct ExactLine {
  const A* dots;
  int64_t cols;
  Metric metric;
  A row_sq_norm, row_limit, row_top;
  const A *col_sq_norm, *col_limit, *col_top;
  A* out;
  uint8_t *row_hits, *col_hits;
  uint64_t *row_words, *col_words;
};

template <Metric kMetric, typename A>
[[gnu::always_inline]] inline void exact_line_loop(int64_t cols, const A* __restrict dots, A xn,
                                                   const A* __restrict sq_norm, A* __restrict out, A limit, A top,
                                                   const A* __restrict col_limit, const A* __restrict col_top,
                                                   uint8_t* __restrict row_hits, uint8_t* __restrict col_hits) {
  for (int64_t c = 0; c < cols; ++c) {
    const A d = pair_distance(dots[c], xn, sq_norm[c], kMetric);
    out[c] = d;
    row_hits[c] = uint8_t((d <= limit) | (d >= top));
    col_hits[c] = uint8_t((d <= col_limit[c]) | (d >= col_top[c]));
  }
}

template <Metric kMetric, typename A> [[gnu::always_inline]] inline void exact_line_body(const ExactLine<A>& in) {
  exact_line_loop<kMetric>(in.cols, in.dots, in.row_sq_norm, in.col_sq_norm, in.out, in.row_limit, in.row_top,
                           in.col_limit, in.col_top, in.row_hits, in.col_hits);
}

template <typename A> void exact_line_portable(const ExactLine<A>& in) {
  switch (in.metric) {
    case Metric::kCosine: return exact_line_body<Metric::kCosine>(in);
    case Metric::kSqEuclidean: return exact_line_body<Metric::kSqEuclidean>(in);
    case Metric::kEuclidean: return exact_line_body<Metric::kEuclidean>(in);
  }
}

template <typename A> DPM_OPS_AVX512_TARGET void exact_line_avx512(const ExactLine<A>& in) {
  switch (in.metric) {
    case Metric::kCosine: return exact_line_body<Metric::kCosine>(in);
    case Metric::kSqEuclidean: return exact_line_body<Metric::kSqEuclidean>(in);
    case Metric::kEuclidean: return exact_line_body<Metric::kEuclidean>(in);
  }
}

template <typename A> void exact_line(const ExactLine<A>& in) {
  if (has_avx512()) exact_line_avx512(in);
  else exact_line_portable(in);
  pack_hits<true>(in.cols, in.row_hits, in.col_hits, in.row_words, in.col_words);
}

// The m-th smallest of `values` (reordered; +inf when there are fewer than m).
template <typename A> A mth_value(std::vector<A>& values, int64_t m) {
  if (int64_t(values.size()) < m) return std::numeric_limits<A>::infinity();
  std::nth_element(values.begin(), values.begin() + (m - 1), values.end());
  return values[m - 1];
}

// The m-th smallest of v[0, n) (+inf when n < m). With a `guess` (e.g. a little above a similar row's
// answer), one branch-free pass keeps the values at or below it: when m or more remain, the answer is
// among them, their m-th smallest. Otherwise, for small m, through a sorted buffer of the m smallest:
// after the first few values almost every value fails one comparison with the m-th, the sooner the
// smaller the first values are, so the values around `near` (where the caller expects the smallest:
// a row's own column in a diagonal tile, its identity in ordered data) go first. A larger m would
// shift O(m) values per insertion, so it selects on a copy (O(n)).
template <typename A>
A mth_smallest(const A* v, int64_t n, int64_t m, std::vector<A>& smallest, int64_t near = 0,
               A guess = std::numeric_limits<A>::infinity()) {
  constexpr int64_t kMaxInsertionM = 64, kNearWidth = 32;
  if (guess < std::numeric_limits<A>::infinity()) {
    if (int64_t(smallest.size()) < n) smallest.resize(n);
    A* kept = smallest.data();
    int64_t count = 0;
    for (int64_t c = 0; c < n; ++c) {
      kept[count] = v[c];
      count += v[c] <= guess;
    }
    if (count >= m) {
      std::nth_element(kept, kept + (m - 1), kept + count);
      return kept[m - 1];
    }
  }
  if (m > kMaxInsertionM) {
    smallest.assign(v, v + n);
    return mth_value(smallest, m);
  }
  smallest.assign(m, std::numeric_limits<A>::infinity());
  A* s = smallest.data();
  const auto insert = [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      if (!(v[c] < s[m - 1])) continue;
      int64_t p = m - 1;
      for (; p > 0 && v[c] < s[p - 1]; --p) s[p] = s[p - 1];
      s[p] = v[c];
    }
  };
  const int64_t begin = std::clamp<int64_t>(near - kNearWidth, 0, n);
  const int64_t end = std::clamp<int64_t>(near + kNearWidth, 0, n);
  insert(begin, end);
  insert(0, begin);
  insert(end, n);
  return s[m - 1];
}

// Whether stage 1 is likely to pay on these inputs, from the candidate sets of kProbeRows rows of x
// spread over it (their bounds against all of y, as the search computes them): a sampled row whose
// set is over `cap` would fall back to the direct computation after paying for stage 1. Where
// distances are not spread beyond the bound's width (e.g. isotropic random features: hundreds of
// candidates a row, half the rows over the cap), the certified search costs more than the direct
// path; more than a quarter of the sample falling back sends the whole call to the direct path.
// Small calls (below 2^28 multiply-adds) skip the probe: they cost little either way.
template <typename A>
bool certified_pays(const Stage1Rows<A>& x, const A* x_sq_norms, const Stage1Rows<A>& y, const A* y_sq_norms,
                    Metric metric, int64_t m, int64_t cap) {
  constexpr int64_t kProbeRows = 32;
  const int64_t M = x.q.size(0), N = y.q.size(0), D = x.q.size(1);
  if (M < kProbeRows || double(M) * double(N) * double(D) < std::ldexp(1.0, 28)) return true;
  std::vector<int64_t> ids(kProbeRows);
  for (int64_t p = 0; p < kProbeRows; ++p) ids[p] = p * M / kProbeRows;
  const Stage1Rows<A> probe = x.take(at::from_blob(ids.data(), {kProbeRows}, at::kLong).clone());
  Stage1Scratch<A> scratch(kProbeRows, N);
  const int32_t* dots = scratch.gemm(probe, 0, kProbeRows, y, 0, N);
  const A none = std::numeric_limits<A>::infinity();
  int64_t falls_back = 0;
  for (int64_t p = 0; p < kProbeRows; ++p) {
    stage1_line<false>(scratch.line(dots + p * N, N, metric, probe, p, x_sq_norms[ids[p]], y, 0, y_sq_norms, none,
                                    none));
    const A limit = mth_smallest(scratch.upper.data(), N, m, scratch.smallest);
    const int64_t kept =
        std::count_if(scratch.lower.begin(), scratch.lower.begin() + N, [&](A l) { return l <= limit; });
    falls_back += kept > cap;
  }
  return 4 * falls_back <= kProbeRows;
}

// visit(c) for every c in [first, end) whose hit bit is set in `words` (pack_hits: zero past the
// line's end), a word of kHitBlock flags at a time (few are set).
template <class Visit> void for_each_hit(const uint64_t* words, int64_t first, int64_t end, Visit visit) {
  for (int64_t w = first / kHitBlock; w * kHitBlock < end; ++w) {
    uint64_t word = words[w];
    if (w == first / kHitBlock) word &= ~uint64_t(0) << (first % kHitBlock);
    for (; word != 0; word &= word - 1) visit(w * kHitBlock + __builtin_ctzll(word));
  }
}

}  // namespace dpm_ops::knn
