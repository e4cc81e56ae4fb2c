// y[t, n] = sum_k x[t, k] * w[n, k] with w[n, k] = scale[n, k / G] * q[n, k] - min[n, k / G], fp32 throughout.
//
// Exactness: w is rounded like the gguf reference (one product, one subtraction; built with
// -ffp-contract=off so the compiler fuses neither; nibble codes fuse them on purpose where the product is exact,
// see weights8), and every (t, n) output is one 8-lane fused-multiply-add
// chain over k in order, summed across lanes in a fixed order. That chain is the same whatever the row count
// and tile shape, so a row's result never depends on the other rows of the call (lossless speculation).
//
// Speed: the weights stream once per call as int8 or nibble codes (+ one scale per 16/32). Few rows dequantize a
// tile of weight rows in registers for every pass of up to 4 (AVX2) or 6 (AVX-512VL: 32 registers) rows (the tile's
// codes stay in L1); more rows dequantize the tile once into an fp32 buffer and read it from there.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <utility>
#include <vector>

#include "lanes.h"

namespace {

// Register tiles (weight rows x activation rows): AVX2 has 16 vector registers, AVX-512VL 32 (the ymm kept: Zen 4
// runs a zmm op as two ymm halves). Each output is still one 8-lane ymm chain, so both builds agree bit for bit.
#ifdef TREESPEC_WIDE_TILES
constexpr int kDirectTR = 6;   // x rows per pass over a tile: 4 x 6 accumulators
constexpr int kMaxAcc = 24;
constexpr int kBufferedTR = 6;                // x 4 weight rows: 24 accumulators
#else
constexpr int kDirectTR = 4;   // x rows per pass over a tile: 2 x 4 accumulators, twice
constexpr int kMaxAcc = 12;
constexpr int kBufferedTR = 3;                // x 4 weight rows: 12 accumulators
#endif
constexpr int kDirectMaxRows = 12;  // measured (both builds; 8, 12, 16, 18, 24 tried): direct up to here, buffer beyond
constexpr int kTileRows = 4;        // weight rows per tile: the unit of work split between threads
constexpr int64_t kAhead = 2;       // tiles of weight rows fetched ahead (2, 4, 8 measured the same)

// How the codes are stored (block_layout.py): one int8 each, or 4-bit codes 0..15 packed in 32-column units,
// byte j of a unit holding code j (low nibble) and code j + 16 (high nibble).
enum class Codes { kInt8, kNibble };

template <int G, bool HAS_MIN, Codes C>
struct Blocks {
  static constexpr int kGroupBytes = C == Codes::kInt8 ? G : G / 2;  // code bytes per group of a row
  const uint8_t* q;     // [N, K] int8, or [N, K / 2] nibbles
  const float* scale;   // [N, K / G]
  const float* min;     // [N, K / G], read only when HAS_MIN
  float* y;             // [T, N]
  const float* x;       // [T, K]
  int64_t T, N, K;

#ifdef TREESPEC_WIDE_TILES
  // Row n's group g of nibble codes, ready to give its weights 8 at a time (k order). AVX-512VL: the group's 16
  // possible weights scale * c - min (c = 0..15, each rounded as weights8 rounds it) in two registers, and the
  // codes widened to 32-bit lanes; vpermt2ps reads only an index's low 4 bits, so a lane holding a whole byte
  // picks its low nibble (codes 0-15) and the byte shifted right by 4 its high one (codes 16-31): 2 ops per 8
  // weights where converting each code costs 4.
  struct Nibbles {
    __m256 low, high;    // the weights of codes 0-7 and 8-15
    __m256i bytes[2];    // bytes 0-7 and 8-15 of the group, one per lane
    __m256 operator()(int j) const {  // weights 8j .. 8j + 7
      const __m256i b = bytes[j % 2];
      return _mm256_permutex2var_ps(low, j < 2 ? b : _mm256_srli_epi32(b, 4), high);
    }
  };
  Nibbles nibbles(int64_t n, int64_t g, __m256 s, __m256 m) const {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * (K / 2) + g * 16));
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 c0 = _mm256_cvtepi32_ps(iota), c1 = _mm256_cvtepi32_ps(_mm256_add_epi32(iota, _mm256_set1_epi32(8)));
    return {weights_of(c0, s, m), weights_of(c1, s, m),
            {_mm256_cvtepu8_epi32(v), _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v))}};
  }
#else
  // Row n's group g of nibble codes, ready to give its weights 8 at a time (k order): the 32 codes as int8 in two
  // registers (codes 0-15, codes 16-31; 4 ops), each 8 converted to fp32 and scaled on demand.
  struct Nibbles {
    __m128i lo, hi;
    __m256 s, m;
    __m256 operator()(int j) const {
      const __m128i h = j < 2 ? lo : hi;
      return weights8(j % 2 ? _mm_unpackhi_epi64(h, h) : h, s, m);
    }
  };
  Nibbles nibbles(int64_t n, int64_t g, __m256 s, __m256 m) const {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * (K / 2) + g * 16));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    return {_mm_and_si128(v, nibble), _mm_and_si128(_mm_srli_epi16(v, 4), nibble), s, m};
  }
#endif
  const int8_t* int8_codes(int64_t n, int64_t g) const { return reinterpret_cast<const int8_t*>(q + n * K + g * G); }
  static __m128i load8(const int8_t* c) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)); }

  // 8 weights from the 8 int8 codes in q8's low half: scale * q - min, each operation rounded once.
  // 4-bit codes: scales have at most 20 significant bits (block_layout.with_bits), so scale * q is exact and one
  // fused multiply-subtract rounds as the product and the subtraction did.
  static __m256 weights8(__m128i q8, __m256 s, __m256 m) {
    return weights_of(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), s, m);
  }
  static __m256 weights_of(__m256 q, __m256 s, __m256 m) {  // q: codes as fp32
    if constexpr (HAS_MIN && C == Codes::kNibble) return _mm256_fmsub_ps(s, q, m);
    const __m256 v = _mm256_mul_ps(s, q);
    return HAS_MIN ? _mm256_sub_ps(v, m) : v;
  }

  __m256 scale_of(int64_t n, int64_t g) const { return _mm256_set1_ps(scale[n * (K / G) + g]); }

  // Measured (q8_head.cpp, the same loop): a thread streams interleaved weight rows at ~5 GB/s without this, ~17
  // with it. During group g of rows n0..n0+nr (contiguous codes, scales, mins), fetch group g's share of the same
  // rows kAhead tiles further on. Past the end it fetches nothing useful, harmlessly (prefetches never fault).
  void prefetch_ahead(int64_t n0, int nr, int64_t g) const {
    const int64_t n = n0 + kAhead * kTileRows;
    const uint8_t* codes = q + n * (K / G) * kGroupBytes + g * nr * kGroupBytes;
    for (int line = 0; line < nr * kGroupBytes; line += 64) prefetch(codes + line);
    prefetch(scale + n * (K / G) + g * nr);
    if (HAS_MIN) prefetch(min + n * (K / G) + g * nr);
  }
  __m256 min_of(int64_t n, int64_t g) const {
    return HAS_MIN ? _mm256_set1_ps(min[n * (K / G) + g]) : _mm256_setzero_ps();
  }

  // Rows t0..t0+TR of x against weight rows n0..n0+NR, dequantizing in registers.
  template <int NR, int TR>
  __attribute__((noinline)) void direct_tile(int64_t t0, int64_t n0) const {
    __m256 acc[NR][TR];
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < TR; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / G; ++g) {
      prefetch_ahead(n0, NR, g);
      if constexpr (C != Codes::kInt8) {  // a row's group at a time: its unpacked codes stay in 2 registers
        for (int r = 0; r < NR; ++r) {
          const __m256 s = scale_of(n0 + r, g), m = min_of(n0 + r, g);
          const Nibbles c = nibbles(n0 + r, g, s, m);
          for (int j = 0; j < G / kLanes; ++j) {
            const __m256 wv = c(j);
            for (int t = 0; t < TR; ++t)
              acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (t0 + t) * K + g * G + j * kLanes), acc[r][t]);
          }
        }
        continue;
      }
      __m256 s[NR], m[NR];
      for (int r = 0; r < NR; ++r) { s[r] = scale_of(n0 + r, g); m[r] = min_of(n0 + r, g); }
      for (int64_t k = g * G, j = 0; k < (g + 1) * G; k += kLanes, j += kLanes) {
        if constexpr (TR <= NR) {  // few x rows: keep them in registers, one weight vector at a time
          __m256 xv[TR];
          for (int t = 0; t < TR; ++t) xv[t] = _mm256_loadu_ps(x + (t0 + t) * K + k);
          for (int r = 0; r < NR; ++r) {
            const __m256 wv = weights8(load8(int8_codes(n0 + r, g) + j), s[r], m[r]);
            for (int t = 0; t < TR; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
          }
        } else {  // many: keep the weight vectors, one x vector at a time (the same chains, other issue order)
          __m256 wv[NR];
          for (int r = 0; r < NR; ++r) wv[r] = weights8(load8(int8_codes(n0 + r, g) + j), s[r], m[r]);
          for (int t = 0; t < TR; ++t) {
            const __m256 xv = _mm256_loadu_ps(x + (t0 + t) * K + k);
            for (int r = 0; r < NR; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < TR; ++t) y[(t0 + t) * N + n0 + r] = lane_sum(acc[r][t]);
  }

  // x rows t0..t0+TR' (TR' <= TR) against the 4 weight rows: at once if the accumulators fit, else (and for 4 x
  // rows: 2x4 twice measured 3% faster than 4x4) by halves
  template <int TR>
  void direct_pass(int64_t t0, int64_t n0, int64_t rows) const {
    if constexpr (TR > 0) {
      if (rows != TR) direct_pass<TR - 1>(t0, n0, rows);
      else if constexpr (TR * kTileRows <= kMaxAcc && TR != 4) direct_tile<kTileRows, TR>(t0, n0);
      else { direct_tile<kTileRows / 2, TR>(t0, n0); direct_tile<kTileRows / 2, TR>(t0, n0 + kTileRows / 2); }
    }
  }

  // Every pass re-dequantizes the tile: as few passes as the registers allow, of balanced sizes (8 = 4 + 4).
  void direct_rows(int64_t n0, int64_t nr) const {
    if (nr < kTileRows) {
      for (int64_t n = n0; n < n0 + nr; ++n)
        for (int64_t t = 0; t < T; ++t) direct_tile<1, 1>(t, n);
      return;
    }
    const int64_t passes = (T + kDirectTR - 1) / kDirectTR;
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t t0 = T * p / passes;
      direct_pass<kDirectTR>(t0, n0, T * (p + 1) / passes - t0);
    }
  }

  // Weight rows n0..n0+nr -> buf [nr, K] fp32.
  void dequant_rows(int64_t n0, int64_t nr, float* buf) const {
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t g = 0; g < K / G; ++g) {
        if (r == 0) prefetch_ahead(n0, static_cast<int>(nr), g);
        const __m256 s = scale_of(n0 + r, g), m = min_of(n0 + r, g);
        float* out = buf + r * K + g * G;
        if constexpr (C == Codes::kInt8) {
          for (int j = 0; j < G / kLanes; ++j)
            _mm256_storeu_ps(out + j * kLanes, weights8(load8(int8_codes(n0 + r, g) + j * kLanes), s, m));
        } else {
          const Nibbles c = nibbles(n0 + r, g, s, m);
          for (int j = 0; j < G / kLanes; ++j) _mm256_storeu_ps(out + j * kLanes, c(j));
        }
      }
  }

  // rows t0 + t of x against weight rows n0 + r
  auto store(int64_t t0, int64_t n0) const {
    return [this, t0, n0](int r, int t, float v) { y[(t0 + t) * N + n0 + r] = v; };
  }

  template <int NR, int TR>
  void buffered_rest(const float* buf, int64_t t0, int64_t n0, int64_t rest) const {
    if constexpr (TR > 0) {
      if (rest == TR) buffered_tile<NR, TR>(buf, x, K, t0, store(t0, n0));
      else buffered_rest<NR, TR - 1>(buf, t0, n0, rest);
    }
  }

  template <int NR>
  void buffered_rows_of(const float* buf, int64_t n0) const {
    int64_t t = 0;
    for (; t + kBufferedTR <= T; t += kBufferedTR) buffered_tile<NR, kBufferedTR>(buf, x, K, t, store(t, n0));
    buffered_rest<NR, kBufferedTR - 1>(buf, t, n0, T - t);
  }

  void buffered_rows(int64_t n0, int64_t nr, float* buf) const {
    dequant_rows(n0, nr, buf);
    if (nr == kTileRows) buffered_rows_of<kTileRows>(buf, n0);
    else for (int64_t r = 0; r < nr; ++r) buffered_rows_of<1>(buf + r * K, n0 + r);
  }

  void run() const {
    const int64_t tiles = (N + kTileRows - 1) / kTileRows;
    const bool direct = T <= kDirectMaxRows;
    at::parallel_for(0, tiles, direct ? 16 : 4, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(direct ? 0 : kTileRows * K);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n0 = i * kTileRows, nr = std::min<int64_t>(kTileRows, N - n0);
        if (direct) direct_rows(n0, nr);
        else buffered_rows(n0, nr, buf.data());
      }
    });
  }
};

template <int G, bool HAS_MIN, Codes C>
void run_blocks(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& min,
                torch::Tensor& y) {
  const Blocks<G, HAS_MIN, C> b{static_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr<float>(),
                                HAS_MIN ? min.data_ptr<float>() : nullptr, y.data_ptr<float>(), x.data_ptr<float>(),
                                x.size(0), q.size(0), x.size(1)};
  b.run();
}

template <int G, Codes C>
void run_blocks(bool has_min, const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                const torch::Tensor& min, torch::Tensor& y) {
  if (has_min) run_blocks<G, true, C>(x, q, scale, min, y);
  else run_blocks<G, false, C>(x, q, scale, min, y);
}

}  // namespace

// x: [T, K] fp32; codes q: [N, K] int8, or [N, K / 2] uint8 nibbles (see Codes; scales with at most 20 significant
// bits); scale: [N, K / G] fp32, min: [N, K / G] fp32 or empty -> [T, N] fp32
inline torch::Tensor block_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: [T, K] fp32 contiguous");
  const int64_t K = x.size(1), N = q.size(0);
  const bool packed = q.scalar_type() == torch::kByte;
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && (packed || q.scalar_type() == torch::kChar),
              "q: [N, K] int8 or [N, K / 2] uint8, contiguous");
  TORCH_CHECK(q.size(1) == (packed ? K / 2 : K) && (G == 16 || G == 32) && K % G == 0 && (!packed || G == 32),
              "x [T, K], q [N, K] (int8) or [N, K / 2] (nibbles, G 32), G 16 or 32, K % G == 0");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == N * (K / G),
              "scale: [N, K / G] fp32 contiguous");
  const bool has_min = min.numel() > 0;
  TORCH_CHECK(!has_min || (min.scalar_type() == torch::kFloat && min.is_contiguous() && min.numel() == N * (K / G)),
              "min: [N, K / G] fp32 contiguous, or empty");
  auto y = torch::empty({x.size(0), N}, x.options());
  if (packed) run_blocks<32, Codes::kNibble>(has_min, x, q, scale, min, y);
  else if (G == 32) run_blocks<32, Codes::kInt8>(has_min, x, q, scale, min, y);
  else run_blocks<16, Codes::kInt8>(has_min, x, q, scale, min, y);
  return y;
}
