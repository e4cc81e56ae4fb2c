// y[t, n] = sum_k x[t, k] * w[n, k] with w[n, k] = scale[n, k / G] * q[n, k] - min[n, k / G], fp32 throughout.
//
// Exactness: w is rounded like the gguf reference (one product, one subtraction; built with
// -ffp-contract=off so the compiler fuses neither), and every (t, n) output is one 8-lane fused-multiply-add
// chain over k in order, summed across lanes in a fixed order. That chain is the same whatever the row count
// and tile shape, so a row's result never depends on the other rows of the call (lossless speculation).
//
// Speed: the weights stream once per call as int8 (+ one scale per 16/32). Few rows dequantize a tile of
// weight rows in registers for every pass of up to 4 (AVX2) or 6 (AVX-512VL: 32 registers) rows (the tile's
// codes stay in L1); more rows dequantize the tile once into an fp32 buffer and read it from there.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
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
#ifndef DIRECT_MAX_ROWS
#define DIRECT_MAX_ROWS 12
#endif
constexpr int kDirectMaxRows = DIRECT_MAX_ROWS;  // measured: re-dequantizing per few rows wins up to here
constexpr int kTileRows = 4;        // weight rows per tile: the unit of work split between threads
constexpr int64_t kAhead = 2;       // tiles of weight rows fetched ahead

template <int G, bool HAS_MIN>
struct Blocks {
  const int8_t* q;      // [N, K]
  const float* scale;   // [N, K / G]
  const float* min;     // [N, K / G], read only when HAS_MIN
  float* y;             // [T, N]
  const float* x;       // [T, K]
  int64_t T, N, K;

  // 8 weights of row n from column k: scale * q - min, each operation rounded once.
  __m256 weights8(int64_t n, int64_t k, __m256 s, __m256 m) const {
    const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + n * K + k));
    const __m256 v = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
    return HAS_MIN ? _mm256_sub_ps(v, m) : v;
  }

  __m256 scale_of(int64_t n, int64_t g) const { return _mm256_set1_ps(scale[n * (K / G) + g]); }

  // Measured (q8_head.cpp, the same loop): a thread streams interleaved weight rows at ~5 GB/s without this, ~17
  // with it. During group g of rows n0..n0+nr (contiguous codes, scales, mins), fetch group g's share of the same
  // rows kAhead tiles further on. Past the end it fetches nothing useful, harmlessly (prefetches never fault).
  void prefetch_ahead(int64_t n0, int nr, int64_t g) const {
    const int64_t n = n0 + kAhead * kTileRows;
    const char* codes = reinterpret_cast<const char*>(q + n * K) + g * nr * G;
    for (int line = 0; line < nr * G; line += 64) prefetch(codes + line);
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
      __m256 s[NR], m[NR];
      for (int r = 0; r < NR; ++r) { s[r] = scale_of(n0 + r, g); m[r] = min_of(n0 + r, g); }
      prefetch_ahead(n0, NR, g);
      for (int64_t k = g * G; k < (g + 1) * G; k += kLanes) {
        if constexpr (TR <= NR) {  // few x rows: keep them in registers, one weight vector at a time
          __m256 xv[TR];
          for (int t = 0; t < TR; ++t) xv[t] = _mm256_loadu_ps(x + (t0 + t) * K + k);
          for (int r = 0; r < NR; ++r) {
            const __m256 wv = weights8(n0 + r, k, s[r], m[r]);
            for (int t = 0; t < TR; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
          }
        } else {  // many: keep the weight vectors, one x vector at a time (the same chains, other issue order)
          __m256 wv[NR];
          for (int r = 0; r < NR; ++r) wv[r] = weights8(n0 + r, k, s[r], m[r]);
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

  // x rows t0..t0+TR' (TR' <= TR) against the 4 weight rows: at once if the accumulators fit, else by halves
  template <int TR>
  void direct_pass(int64_t t0, int64_t n0, int64_t rows) const {
    if constexpr (TR > 0) {
      if (rows != TR) direct_pass<TR - 1>(t0, n0, rows);
      else if constexpr (TR * kTileRows <= kMaxAcc) direct_tile<kTileRows, TR>(t0, n0);
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
        for (int64_t k = g * G; k < (g + 1) * G; k += kLanes) _mm256_storeu_ps(buf + r * K + k, weights8(n0 + r, k, s, m));
      }
  }

  // rows t0 + t of x against weight rows n0 + r
  auto store(int64_t t0, int64_t n0) const { return [this, t0, n0](int r, int t, float v) { y[(t0 + t) * N + n0 + r] = v; }; }

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

template <int G, bool HAS_MIN>
void run_blocks(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                const torch::Tensor& min, torch::Tensor& y) {
  const Blocks<G, HAS_MIN> b{q.data_ptr<int8_t>(), scale.data_ptr<float>(),
                             HAS_MIN ? min.data_ptr<float>() : nullptr, y.data_ptr<float>(), x.data_ptr<float>(),
                             x.size(0), q.size(0), x.size(1)};
  b.run();
}

}  // namespace

// x: [T, K] fp32, q: [N, K] int8, scale: [N, K / G] fp32, min: [N, K / G] fp32 or empty -> [T, N] fp32
torch::Tensor block_mm(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor min, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: [T, K] fp32 contiguous");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: [N, K] int8 contiguous");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && (G == 16 || G == 32) && K % G == 0, "x [T, K], q [N, K], G 16 or 32, K % G == 0");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == N * (K / G),
              "scale: [N, K / G] fp32 contiguous");
  const bool has_min = min.numel() > 0;
  TORCH_CHECK(!has_min || (min.scalar_type() == torch::kFloat && min.is_contiguous() && min.numel() == N * (K / G)),
              "min: [N, K / G] fp32 contiguous, or empty");
  auto y = torch::empty({x.size(0), N}, x.options());
  if (G == 32 && has_min) run_blocks<32, true>(x, q, scale, min, y);
  else if (G == 32) run_blocks<32, false>(x, q, scale, min, y);
  else if (has_min) run_blocks<16, true>(x, q, scale, min, y);
  else run_blocks<16, false>(x, q, scale, min, y);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_mm", &block_mm, "x @ (scale * q - min)^T in fp32; see block_mm.cpp");
}
