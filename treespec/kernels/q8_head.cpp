// The tied Q8_0 head: logits[t, n] = sum_k x[t, k] * (d[n, k / 32] * q[n, k]), fp32, with d kept as fp16.
//
// Exactness: every (t, n) is one fixed 8-lane chain: per group of 32, the codes times x (as fp32: exact values)
// summed by FMA, then that sum times the group's d (fp16, 11 significant bits: d * sum is exact inside the
// FMA) added to the row's accumulator, then the fixed lane sum of lanes.h. It is an fp32 dot product of the
// dequantized weights in one summation order (27 roundings deep), so within gamma_D sum |w_j x_j| of the exact
// one, as q8_head.py's bound asks. The chain never depends on the row count, the tile or the thread, so a row's
// logits and argmax never depend on the other rows of the call. Applying d once per group instead of per weight
// measured 5.37 -> 4.54 ms for one row of the default head, 7.1 -> 6.3 for two, 9.4 -> 8.4 for three.
//
// Speed: the head streams once per call as 1 byte per weight plus 2 bytes per 32 (34 bytes per 32 weights, as
// in the file), and `topk` keeps each row's K best (value, id) while it goes instead of writing 262144 logits
// per row: one insertion test per logit, and only the first of equal values is kept, so a row's first entry is
// the argmax with the lowest id on ties, the same with any thread count (topk.h).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <vector>

#include "lanes.h"
#include "topk.h"

namespace {

constexpr int kGroup = 32;
constexpr int kTileRows = 4;        // weight rows dequantized together
constexpr int64_t kAhead = 2;       // tiles of codes fetched ahead (measured: 2 best of 2, 8, 32)

struct Head {
  const int8_t* q;         // [N, K]
  const uint16_t* d;       // [N, K / 32] fp16 bits
  const float* x;          // [T, K]
  int64_t T, N, K;

  __m256 scale_of(int64_t n, int64_t g) const { return _mm256_set1_ps(_cvtsh_ss(d[n * (K / kGroup) + g])); }

  // Measured: 1-4 rows stream the head at ~5 GB/s without this (the hardware prefetcher does not keep up with
  // 4 interleaved row reads), ~17 GB/s with it, per thread. During group g of rows n0..n0+nr (nr * K contiguous
  // codes), fetch group g's share of the same rows kAhead tiles further on, and their scales at the first group.
  void prefetch_ahead(int64_t n0, int nr, int64_t g) const {
    const int64_t n = n0 + kAhead * kTileRows;
    const char* codes = reinterpret_cast<const char*>(q + n * K) + g * nr * kGroup;
    for (int line = 0; line < nr * kGroup; line += 64) prefetch(codes + line);
    if (g == 0)
      for (int line = 0; line < nr * (K / kGroup) * 2; line += 64)
        prefetch(reinterpret_cast<const char*>(d + n * (K / kGroup)) + line);
  }

  // out[t0 + t][c + r] = logit of x row t0 + t and weight row n0 + r, dequantizing in registers
  template <int NR, int TR>
  __attribute__((noinline)) void direct_tile(int64_t t0, int64_t n0, float out[][kTileRows], int c) const {
    __m256 acc[NR][TR];
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < TR; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / kGroup; ++g) {
      prefetch_ahead(n0, NR, g);
      for (int r = 0; r < NR; ++r) {
        const int8_t* codes = q + (n0 + r) * K + g * kGroup;
        __m256 wq[kGroup / kLanes];  // the group's codes as fp32 (exact)
        for (int j = 0; j < kGroup / kLanes; ++j) {
          const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j * kLanes));
          wq[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
        }
        const __m256 s = scale_of(n0 + r, g);
        for (int t = 0; t < TR; ++t) {
          const float* xr = x + (t0 + t) * K + g * kGroup;
          __m256 part = _mm256_mul_ps(wq[0], _mm256_loadu_ps(xr));
          for (int j = 1; j < kGroup / kLanes; ++j)
            part = _mm256_fmadd_ps(wq[j], _mm256_loadu_ps(xr + j * kLanes), part);
          acc[r][t] = _mm256_fmadd_ps(s, part, acc[r][t]);
        }
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < TR; ++t) out[t0 + t][c + r] = lane_sum(acc[r][t]);
  }

  // out[t][r] for all T rows and the nr (<= 4) weight rows from n0: passes of up to 4 x rows, each dequantizing
  // the tile again in registers (an AVX2 tile holds at most 14 of the 16 vector registers)
  void tile(int64_t n0, int64_t nr, float out[][kTileRows]) const {
    if (nr < kTileRows) {  // the vocabulary's last rows, one at a time
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t t = 0; t < T; ++t) direct_tile<1, 1>(t, n0 + r, out, r);
      return;
    }
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) { direct_tile<2, 4>(t, n0, out, 0); direct_tile<2, 4>(t, n0 + 2, out, 2); }
    if (T - t == 3) { direct_tile<2, 3>(t, n0, out, 0); direct_tile<2, 3>(t, n0 + 2, out, 2); }
    if (T - t == 2) direct_tile<4, 2>(t, n0, out, 0);
    if (T - t == 1) direct_tile<4, 1>(t, n0, out, 0);
  }

  // Weight rows [n_begin, n_end): logits into y [T, N], or each row's top-K into val/id [T, k].
  void slice(int64_t n_begin, int64_t n_end, float* y, float* val, int64_t* id, int k) const {
    std::vector<float> out_store(T * kTileRows);
    auto out = reinterpret_cast<float (*)[kTileRows]>(out_store.data());
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileRows) {
      const int64_t nr = std::min<int64_t>(kTileRows, n_end - n0);
      tile(n0, nr, out);
      keep_tile<kTileRows>(out, T, n0, nr, N, y, val, id, k);
    }
  }
};

Head make_head(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: [T, K] fp32 contiguous");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous(), "q: [N, K] int8 contiguous");
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && K % kGroup == 0, "x [T, K], q [N, K], K % 32 == 0");
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.numel() == N * (K / kGroup),
              "d: [N, K / 32] fp16 contiguous");
  return Head{q.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
              x.data_ptr<float>(), x.size(0), N, K};
}

}  // namespace

// x: [T, K] fp32, q: [N, K] int8, d: [N, K / 32] fp16 -> [T, N] fp32 logits
torch::Tensor q8_logits(torch::Tensor x, torch::Tensor q, torch::Tensor d) {
  return all_values(make_head(x, q, d), kTileRows);
}

// x: [T, K] fp32, q: [N, K] int8, d: [N, K / 32] fp16 -> each row's k best logits and their ids (topk.h)
std::vector<torch::Tensor> q8_topk(torch::Tensor x, torch::Tensor q, torch::Tensor d, int64_t k) {
  return top_values(make_head(x, q, d), kTileRows, k);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_logits", &q8_logits, "x @ (d * q)^T in fp32 over Q8_0 blocks with fp16 scales; see q8_head.cpp");
  m.def("q8_topk", &q8_topk, "each row's k best logits (lowest id on ties) without writing the logits");
}
