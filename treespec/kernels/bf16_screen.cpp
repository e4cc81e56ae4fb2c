// Screened logits of a Q8_0 head with AVX512_BF16: s[t, n] = sum_k x~[t, k] * w~[n, k], w~ = bf16(d[n, k/32] * q[n, k])
// (d * q is exact in fp32, then one round to nearest even), x~ the caller's bf16 activations, and the products
// summed by vdpbf16ps in fp32 (the error bound is in bf16_screen.py).
//
// Speed: a tile of kTopRows weight rows is rounded to bf16 kTileRows at a time (into a small buffer) and used
// for every activation row, kRowTile rows at a time in registers, so from a few rows the cost is one vdpbf16ps
// per 32 multiply-adds (fp32 FMAs do 16) over half the bytes of an fp32 weight; one activation row rounds the
// weights in registers instead. `topk` keeps each row's best values while it goes (topk.h), as the Q8_0 head
// does, instead of writing 262144 values per row. Each (t, n) is one fixed chain (one accumulator over the
// groups in order, then one reduction), whatever T, the path, the thread count or the other rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <vector>

#include "lanes.h"
#include "topk.h"

namespace {

constexpr int kGroup = 32;      // Q8_0 block, and the 32 bf16 of one zmm
// weight rows rounded together x activation rows per register tile; measured on the real head, 1 thread,
// ms at 4 / 8 / 16 rows: 2 x 8 19.8 / 30.1 / 51.4, 4 x 4 25.9 / 42.1 / 59.5, 2 x 12 19.8 / 30.2 / 59.4,
// 8 x 3 31.0 / 41.4 / 60.0, 1 x 16 21.2 / 32.0 / 65.3
constexpr int kTileRows = 2;
constexpr int kRowTile = 8;
constexpr int kTopRows = 8;     // weight rows per tile of a slice (topk.h)
constexpr int64_t kAhead = 2;   // tiles fetched ahead

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
    for (g = 0; g < groups; ++g) out[g] = rounded(n, g, _mm512_set1_ps(scales[g]));
  }

  // bf16(s * q) of weight row n's group g (s: its scale, broadcast), lanes in k order
  __m512bh rounded(int64_t n, int64_t g, __m512 s) const {
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + n * K + g * kGroup));
    const __m512 lo = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes))));
    const __m512 hi = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1))));
    return _mm512_cvtne2ps_pbh(hi, lo);  // elements 0..15 from lo, 16..31 from hi
  }

  // During group g of rows n..n+nr (nr * K contiguous codes), fetch group g's share of the same rows kAhead
  // tiles further on, and their scales at the first group (as q8_head.cpp; the hardware prefetcher alone does
  // not keep up with several interleaved row reads).
  void prefetch_share(int64_t n, int nr, int64_t g) const {
    n = std::min(n + kAhead * kTopRows, N - nr);
    const char* codes = reinterpret_cast<const char*>(q + n * K) + g * nr * kGroup;
    for (int line = 0; line < nr * kGroup; line += 64) prefetch(codes + line);
    if (g == 0)
      for (int line = 0; line < nr * (K / kGroup) * 2; line += 64)
        prefetch(reinterpret_cast<const char*>(d + n * (K / kGroup)) + line);
  }

  // out[t][c + r] = s of activation row t and weight rows n0.. (NR), rounding the weights in registers (the same
  // bf16 values as dequantize())
  template <int NR>
  __attribute__((noinline)) void direct_tile(int64_t n0, int64_t t, float out[][kTopRows], int c) const {
    __m512 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t groups = K / kGroup;
    for (int64_t g = 0; g < groups; ++g) {
      prefetch_share(n0, NR, g);
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + t * K + g * kGroup);
      for (int r = 0; r < NR; ++r) {
        const __m512bh w = rounded(n0 + r, g, _mm512_set1_ps(_cvtsh_ss(d[(n0 + r) * groups + g])));
        acc[r] = _mm512_dpbf16_ps(acc[r], w, xv);
      }
    }
    for (int r = 0; r < NR; ++r) out[t][c + r] = _mm512_reduce_add_ps(acc[r]);
  }

  // out[t0 + t][c + r] for activation rows t0.. (TR of them) and the kTileRows rounded rows in w
  template <int TR>
  __attribute__((noinline)) void tile(const __m512bh* w, int64_t t0, float out[][kTopRows], int c) const {
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
      for (int t = 0; t < TR; ++t) out[t0 + t][c + r] = _mm512_reduce_add_ps(acc[r][t]);
  }

  // the last T - t0 (< kRowTile) rows in one tile
  template <int TR>
  void rest(const __m512bh* w, int64_t t0, float out[][kTopRows], int c) const {
    if constexpr (TR > 0) {
      if (T - t0 == TR) tile<TR>(w, t0, out, c);
      else rest<TR - 1>(w, t0, out, c);
    }
  }

  // out[t][0..kTopRows) for the kTopRows weight rows from n0: one activation row in registers; more from the
  // weights rounded kTileRows rows at a time into w (kTopRows * K / 32 vectors; scales: K / 32 scratch). Rounding
  // all kTopRows rows first measured ~10% slower at 2-4 rows (the rounding no longer overlaps the products).
  void full_tile(int64_t n0, __m512bh* w, float* scales, float out[][kTopRows]) const {
    if (T == 1) return direct_tile<kTopRows>(n0, 0, out, 0);
    const int64_t groups = K / kGroup;
    for (int c = 0; c < kTopRows; c += kTileRows) {
      for (int r = c; r < c + kTileRows; ++r) {
        for (int64_t g = 0; g < groups; g += 2) prefetch_share(n0 + r, 1, g);  // the row's codes and scales
        dequantize(n0 + r, w + r * groups, scales);
      }
      int64_t t = 0;
      for (; t + kRowTile <= T; t += kRowTile) tile<kRowTile>(w + c * groups, t, out, c);
      rest<kRowTile - 1>(w + c * groups, t, out, c);
    }
  }

  // ids [n_begin, n_end) (a slice: whole tiles but at the vocabulary's end): the values into y [T, N], or each
  // row's top-k into val / id [T, k]
  void slice(int64_t n_begin, int64_t n_end, float* y, float* val, int64_t* id, int k) const {
    std::vector<float> store(T * kTopRows);
    auto out = reinterpret_cast<float (*)[kTopRows]>(store.data());
    std::vector<__m512bh> w(kTopRows * (K / kGroup));
    std::vector<float> scales(K / kGroup);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTopRows) {
      const int64_t nr = std::min<int64_t>(kTopRows, n_end - n0);
      if (nr == kTopRows) full_tile(n0, w.data(), scales.data(), out);
      else
        for (int r = 0; r < nr; ++r)
          for (int64_t t = 0; t < T; ++t) direct_tile<1>(n0 + r, t, out, r);
      keep_tile<kTopRows>(out, T, n0, nr, N, y, val, id, k);
    }
  }
};

Screen make_screen(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: [T, K] bf16 contiguous");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: [N, K] int8 contiguous");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && K % kGroup == 0, "x [T, K], q [N, K], K % 32 == 0");
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.numel() == N * (K / kGroup),
              "d: [N, K / 32] fp16 contiguous");
  return Screen{q.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
                reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), x.size(0), N, K};
}

}  // namespace

// x: [T, K] bf16, q: [N, K] int8, d: [N, K / 32] fp16 -> [T, N] fp32 screened values
torch::Tensor bf16_logits(torch::Tensor x, torch::Tensor q, torch::Tensor d) {
  return all_values(make_screen(x, q, d), kTopRows);
}

// x: [T, K] bf16, q: [N, K] int8, d: [N, K / 32] fp16 -> each row's k best screened values and their ids (topk.h)
std::vector<torch::Tensor> bf16_topk(torch::Tensor x, torch::Tensor q, torch::Tensor d, int64_t k) {
  return top_values(make_screen(x, q, d), kTopRows, k);
}

// q: [N, K] int8, d: [N, K / 32] fp16 -> [N, 3] float64: per weight row the sums of squares of w~ = bf16(w) (as
// the screen rounds it), of w - w~ and of w (w = d * q, exact in fp32; the squares summed in float64)
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
  m.def("bf16_logits", &bf16_logits, "bf16 screened logits of a Q8_0 head; see bf16_screen.cpp");
  m.def("bf16_topk", &bf16_topk, "each row's k best screened values (lowest id on ties) without writing them");
}
