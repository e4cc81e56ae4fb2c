// Screened logits of a Q8_0 head with AVX512_BF16: s[t, n] = sum_k x~[t, k] * w~[n, k], w~ = bf16(d[n, k/32] * q[n, k])
// (d * q is exact in fp32, then one round to nearest even), x~ the caller's bf16 activations, and the products
// summed by vdpbf16ps in fp32 (the error bound is in bf16_screen.py).
//
// Speed: a tile of kTileRows weight rows is dequantized to bf16 once (into a small buffer) and used
// for every activation row, kRowTile rows at a time in registers, so from a few rows the cost is one vdpbf16ps
// per 32 multiply-adds (fp32 FMAs do 16) over half the bytes of an fp32 weight. Alongside the logits the kernel
// writes each row's maximum over every run of kBlock ids (lm_head.block_maxima's blocks; NaN propagates), so
// the caller finds its candidates without another pass over [T, V].
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <vector>

#include "lanes.h"

namespace {

constexpr int kGroup = 32;      // Q8_0 block, and the 32 bf16 of one zmm
// weight rows dequantized together x activation rows per register tile; measured on the real head, 1 thread,
// ms at 4 / 8 / 16 rows: 2 x 8 19.8 / 30.1 / 51.4, 4 x 4 25.9 / 42.1 / 59.5, 2 x 12 19.8 / 30.2 / 59.4,
// 8 x 3 31.0 / 41.4 / 60.0, 1 x 16 21.2 / 32.0 / 65.3
constexpr int kTileRows = 2;
constexpr int kRowTile = 8;
constexpr int64_t kBlock = 256; // ids per block maximum (models/lm_head.py _BLOCK)
constexpr int64_t kAhead = 2;   // weight tiles fetched ahead

struct Screen {
  const int8_t* q;      // [N, K]
  const uint16_t* d;    // [N, K / 32] fp16 bits
  const uint16_t* x;    // [T, K] bf16 bits
  int64_t T, N, K;

  // bf16(d * q) for weight row n into out [K / 32] (lanes in k order, as vdpbf16ps pairs them with x);
  // scales [K / 32] is scratch (the row's scales in fp32, converted 16 at a time: measured ~10% of the dequantization)
  void dequantize(int64_t n, __m512bh* out, float* scales) const {
    const int64_t groups = K / kGroup;
    const uint16_t* dn = d + n * groups;
    int64_t g = 0;
    for (; g + 16 <= groups; g += 16)
      _mm512_storeu_ps(scales + g, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dn + g))));
    for (; g < groups; ++g) scales[g] = _cvtsh_ss(dn[g]);
    for (g = 0; g < groups; ++g) {
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + n * K + g * kGroup));
      const __m512 s = _mm512_set1_ps(scales[g]);
      const __m512 lo = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes))));
      const __m512 hi = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1))));
      out[g] = _mm512_cvtne2ps_pbh(hi, lo);  // elements 0..15 from lo, 16..31 from hi
    }
  }

  void prefetch_ahead(int64_t n0) const {
    const int64_t n = std::min(n0 + kAhead * kTileRows, N - kTileRows);
    if (n < 0) return;
    const char* codes = reinterpret_cast<const char*>(q + n * K);
    for (int64_t line = 0; line < kTileRows * K; line += 64) prefetch(codes + line);
    const char* scales = reinterpret_cast<const char*>(d + n * (K / kGroup));
    for (int64_t line = 0; line < kTileRows * (K / kGroup) * 2; line += 64) prefetch(scales + line);
  }

  // out[t0 + t][r] = s for activation rows t0.. (TR of them) and the kTileRows dequantized rows in w
  template <int TR>
  __attribute__((noinline)) void tile(const __m512bh* w, int64_t t0, float out[][kTileRows]) const {
    __m512 acc[kTileRows][TR];
    for (int r = 0; r < kTileRows; ++r)
      for (int t = 0; t < TR; ++t) acc[r][t] = _mm512_setzero_ps();
    const int64_t groups = K / kGroup;
    for (int64_t g = 0; g < groups; ++g) {
      __m512bh xv[TR];
      for (int t = 0; t < TR; ++t)
        xv[t] = (__m512bh)_mm512_loadu_si512(x + (t0 + t) * K + g * kGroup);
      for (int r = 0; r < kTileRows; ++r)
        for (int t = 0; t < TR; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w[r * groups + g], xv[t]);
    }
    for (int r = 0; r < kTileRows; ++r)
      for (int t = 0; t < TR; ++t) out[t0 + t][r] = _mm512_reduce_add_ps(acc[r][t]);
  }

  // the last T - t0 (< kRowTile) rows in one tile
  template <int TR>
  void rest(const __m512bh* w, int64_t t0, float out[][kTileRows]) const {
    if constexpr (TR > 0) {
      if (T - t0 == TR) tile<TR>(w, t0, out);
      else rest<TR - 1>(w, t0, out);
    }
  }

  // ids [n_begin, n_end) (one block): logits into s [T, N], the block's max into m [T, B] at column b
  void block(int64_t n_begin, int64_t n_end, int64_t b, int64_t B, float* s, float* m,
             __m512bh* w, float* scales, float out[][kTileRows]) const {
    const int64_t groups = K / kGroup;
    for (int64_t t = 0; t < T; ++t) m[t * B + b] = -std::numeric_limits<float>::infinity();
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
      const int64_t nr = std::min<int64_t>(kTileRows, n_end - n0);
      prefetch_ahead(n0);
      for (int64_t r = 0; r < kTileRows; ++r) {
        if (r < nr) dequantize(n0 + r, w + r * groups, scales);
        else std::fill(w + r * groups, w + (r + 1) * groups, (__m512bh)_mm512_setzero_si512());
      }
      int64_t t = 0;
      for (; t + kRowTile <= T; t += kRowTile) tile<kRowTile>(w, t, out);
      rest<kRowTile - 1>(w, t, out);
      for (t = 0; t < T; ++t) {
        float best = m[t * B + b];
        for (int64_t r = 0; r < nr; ++r) {
          const float v = out[t][r];
          s[t * N + n0 + r] = v;
          if (v > best || v != v) best = (best != best) ? best : v;  // NaN sticks
        }
        m[t * B + b] = best;
      }
    }
  }
};

}  // namespace

// x: [T, K] bf16, q: [N, K] int8, d: [N, K / 32] fp16 -> ([T, N] fp32 screened logits, [T, ceil(N / 256)] fp32
// block maxima). Each (t, n) is one fixed chain whatever T, the thread count or the other rows.
std::vector<torch::Tensor> bf16_screen(torch::Tensor x, torch::Tensor q, torch::Tensor d) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: [T, K] bf16 contiguous");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: [N, K] int8 contiguous");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && K % kGroup == 0, "x [T, K], q [N, K], K % 32 == 0");
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.numel() == N * (K / kGroup),
              "d: [N, K / 32] fp16 contiguous");
  const Screen sc{q.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
                  reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), T, N, K};
  const int64_t B = (N + kBlock - 1) / kBlock;
  auto s = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  auto m = torch::empty({T, B}, x.options().dtype(torch::kFloat));
  float* sp = s.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512bh> w(kTileRows * (K / kGroup));
    std::vector<float> scales(K / kGroup);
    std::vector<float> out_store(std::max<int64_t>(T, 1) * kTileRows);
    auto out = reinterpret_cast<float (*)[kTileRows]>(out_store.data());
    for (int64_t b = begin; b < end; ++b)
      sc.block(b * kBlock, std::min(N, (b + 1) * kBlock), b, B, sp, mp, w.data(), scales.data(), out);
  });
  return {s, m};
}

// q: [N, K] int8, d: [N, K / 32] fp16 -> [N, 3] float64: per weight row the sums of squares of w~ = bf16(w) (as
// bf16_screen rounds it), of w - w~ and of w (w = d * q, exact in fp32; the squares summed in float64)
torch::Tensor bf16_sums_of_squares(torch::Tensor q, torch::Tensor d) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: [N, K] int8 contiguous");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(K % kGroup == 0 && d.scalar_type() == torch::kHalf && d.is_contiguous() && d.numel() == N * (K / kGroup),
              "q [N, K], K % 32 == 0, d: [N, K / 32] fp16 contiguous");
  const Screen sc{q.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()), nullptr, 0, N, K};
  auto out = torch::empty({N, 3}, q.options().dtype(torch::kDouble));
  double* op = out.data_ptr<double>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    std::vector<__m512bh> w(K / kGroup);
    std::vector<float> scales(K / kGroup);
    for (int64_t n = begin; n < end; ++n) {
      sc.dequantize(n, w.data(), scales.data());
      __m512d acc[3] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
      for (int64_t g = 0; g < K / kGroup; ++g) {
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sc.d[n * (K / kGroup) + g]));
        for (int half = 0; half < 2; ++half) {
          const __m128i q16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc.q + n * K + g * kGroup + half * 16));
          const __m512 exact = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q16)));
          const __m256bh packed = (__m256bh)(half ? _mm512_extracti64x4_epi64((__m512i)w[g], 1)
                                                   : _mm512_castsi512_si256((__m512i)w[g]));
          const __m512 rounded = _mm512_cvtpbh_ps(packed);
          const __m512 diff = _mm512_sub_ps(exact, rounded);  // exact: rounded holds exact's leading bits
          const __m512 parts[3] = {rounded, diff, exact};
          for (int i = 0; i < 3; ++i) {
            const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(parts[i]));
            const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(parts[i]), 1)));
            acc[i] = _mm512_fmadd_pd(lo, lo, _mm512_fmadd_pd(hi, hi, acc[i]));
          }
        }
      }
      for (int i = 0; i < 3; ++i) op[n * 3 + i] = _mm512_reduce_add_pd(acc[i]);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_sums_of_squares", &bf16_sums_of_squares, "per row |bf16(w)|^2, |w - bf16(w)|^2, |w|^2 (float64)");
  m.def("bf16_screen", &bf16_screen, "bf16 screened logits of a Q8_0 head and their block maxima; see bf16_screen.cpp");
}
