// What the AVX2 kernels share: 8-lane fp32 vectors summed in one fixed order, a prefetch the compiler keeps,
// and the product of a few activation rows with a tile of already dequantized weight rows.
#pragma once
#include <immintrin.h>
#include <cstdint>

constexpr int kLanes = 8;

inline float lane_sum(__m256 v) {  // ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)): fixed, whatever the caller
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// GCC drops _mm_prefetch / __builtin_prefetch in these loops at -O1 and above (seen in the assembly); asm keeps it
inline void prefetch(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }

// store(r, t, dot(buf[r], x[t0 + t])) for NR dequantized weight rows buf [NR, K] and TR rows of x [T, K]: one
// 8-lane FMA chain over k in order per output, the same chain as the kernels' in-register path.
template <int NR, int TR, class Store>
__attribute__((noinline)) void buffered_tile(const float* buf, const float* x, int64_t K, int64_t t0, Store store) {
  __m256 acc[NR][TR];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < TR; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += kLanes) {
    __m256 xv[TR];
    for (int t = 0; t < TR; ++t) xv[t] = _mm256_loadu_ps(x + (t0 + t) * K + k);
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = _mm256_loadu_ps(buf + r * K + k);
      for (int t = 0; t < TR; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < TR; ++t) store(r, t, lane_sum(acc[r][t]));
}
