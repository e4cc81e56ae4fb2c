// The small per-row ops of a decode step, one call each: RMSNorm, and attention of a few query rows.
//
// Why: torch's F.rms_norm runs as ~7 small ops on CPU and its fused attention allocates and tiles for large
// problems; at one row (decoding) or a few (a token tree) their fixed cost per call was most of the step's
// non-matmul time (models/layers.py, measured there).
//
// Exactness: every output row is computed on its own, in one fixed order (8-lane FMA chains over the row, the
// lanes summed in a fixed order, keys in ascending order), whatever the number of rows, the tile or the
// thread: a row's result never depends on the other rows of the call (lossless speculation). fp32 throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

#include "lanes.h"

namespace {

// y[b, p, :] = x[b, p, :] / sqrt(mean(x[b, p, :]^2) + eps) * w[p, :]
void rms_rows(const float* x, int64_t x_stride, const float* w, float* y, int64_t B, int64_t P, int64_t D,
              float eps, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const float* xr = x + b * x_stride + p * D;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < D; k += kLanes) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      const __m256 inv = _mm256_set1_ps(1.0f / std::sqrt(lane_sum(acc) / static_cast<float>(D) + eps));
      float* yr = y + (b * P + p) * D;
      for (int64_t k = 0; k < D; k += kLanes)
        _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), inv),
                                               _mm256_loadu_ps(w + p * D + k)));
    }
}

// e^x for 8 lanes with x <= 0 (softmax weights), within ~2 ulp of expf: x = n ln2 + r with |r| <= ln2 / 2
// (ln2 split in two so n ln2 is exact), e^r by a degree-6 polynomial, 2^n through the exponent bits.
// Below -87.3 (where e^x leaves the normal floats) the result is 0.
__m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

constexpr int kKeys = 8;  // keys scored together

struct Attn {
  const float* q; int64_t qs0, qs1;        // [H, n, hd]: head and row strides
  const float* k; int64_t ks0, ks1;        // [KV, L, hd]
  const float* v; int64_t vs0, vs1;        // [KV, L, hd]
  const bool* mask; int64_t ms0;           // [n, L] or null
  float* out;                              // [H, n, hd] contiguous
  int64_t H, KV, n, L, hd;
  float scale;

  // out[u] = q_row . key u for KU consecutive keys: KU independent FMA chains in flight (one chain waits on its FMA
  // latency), each an 8-lane chain over d in order and the fixed lane sum, so a score never depends on KU
  template <int KU>
  void dots(const float* qr, const float* key0, float* out) const {
    __m256 acc[KU];
    for (int u = 0; u < KU; ++u) acc[u] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += kLanes) {
      const __m256 qv = _mm256_loadu_ps(qr + d);
      for (int u = 0; u < KU; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key0 + u * ks1 + d), acc[u]);
    }
    for (int u = 0; u < KU; ++u) out[u] = lane_sum(acc[u]);
  }

  // query row i of the G heads sharing K/V head kvh
  void row(int64_t kvh, int64_t i, float* s) const {
    const int64_t G = H / KV;
    const float* kh = k + kvh * ks0;
    const float* vh = v + kvh * vs0;
    const float lowest = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = q + (kvh * G + g) * qs0 + i * qs1;
      int64_t j = 0;
      for (; j + kKeys <= L; j += kKeys) dots<kKeys>(qr, kh + j * ks1, s + g * L + j);
      for (; j < L; ++j) dots<1>(qr, kh + j * ks1, s + g * L + j);
    }
    for (int64_t j = 0; j < L; ++j) {
      const bool on = mask == nullptr || mask[i * ms0 + j];
      for (int64_t g = 0; g < G; ++g) s[g * L + j] = on ? s[g * L + j] * scale : lowest;
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s + g * L;
      float top = lowest;
      for (int64_t j = 0; j < L; ++j) top = std::max(top, sg[j]);
      float* o = out + ((kvh * G + g) * n + i) * hd;
      if (top == lowest) {  // every key masked
        for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
        continue;
      }
      const float sum = softmax_weights(sg, top);
      weighted_values(sg, vh, o, sum);
    }
  }

  // sg[j] <- exp(sg[j] - top) (0 for masked keys), 8 at a time; returns their sum, taken in key order
  float softmax_weights(float* sg, float top) const {
    const __m256 topv = _mm256_set1_ps(top), low = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + kLanes <= L; j += kLanes) {
      const __m256 x = _mm256_loadu_ps(sg + j);
      const __m256 e = exp8(_mm256_sub_ps(x, topv));
      _mm256_storeu_ps(sg + j, _mm256_andnot_ps(_mm256_cmp_ps(x, low, _CMP_EQ_OQ), e));
    }
    if (j < L) {  // the tail through the same vector code, so every key's weight rounds alike
      alignas(32) float tail[kLanes];
      for (int t = 0; t < kLanes; ++t) tail[t] = j + t < L ? sg[j + t] : top;
      const __m256 x = _mm256_load_ps(tail);
      _mm256_store_ps(tail, _mm256_andnot_ps(_mm256_cmp_ps(x, low, _CMP_EQ_OQ), exp8(_mm256_sub_ps(x, topv))));
      for (int64_t t = 0; j + t < L; ++t) sg[j + t] = tail[t];
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < L; ++t) sum += sg[t];
    return sum;
  }

  // o = sum_j p[j] v[j] / sum, keys in ascending order per element; 64 columns at a time stay in registers
  void weighted_values(const float* p, const float* vh, float* o, float sum) const {
    int64_t d0 = 0;
    for (; d0 + 8 * kLanes <= hd; d0 += 8 * kLanes) value_columns<8>(p, vh + d0, o + d0, sum);
    for (; d0 < hd; d0 += kLanes) value_columns<1>(p, vh + d0, o + d0, sum);
  }

  // C * 8 columns of o (C a constant, so the accumulators live in registers)
  template <int C>
  void value_columns(const float* p, const float* v0, float* o, float sum) const {
    __m256 a[C];
    for (int c = 0; c < C; ++c) a[c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      if (p[j] == 0.0f) continue;  // masked, or a weight that underflowed: adds nothing
      const __m256 pv = _mm256_set1_ps(p[j]);
      for (int c = 0; c < C; ++c) a[c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v0 + j * vs1 + c * kLanes), a[c]);
    }
    const __m256 sv = _mm256_set1_ps(sum);
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + c * kLanes, _mm256_div_ps(a[c], sv));
  }
};

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 3 && t.stride(2) == 1, what, ": 3-D fp32, last dim contiguous");
}

}  // namespace

// x: [..., D] fp32 with w: [D], or [..., P, D] with w: [P, D] (one weight row per head) -> x's shape, contiguous.
// x contiguous, or 3-D with each [P, D] block contiguous and the blocks strided (q/k heads of a fused q/k/v).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat && w.is_contiguous() &&
              (w.dim() == 1 || w.dim() == 2) && x.dim() >= w.dim(), "x, w: fp32, w [D] or [P, D] contiguous");
  const int64_t P = w.dim() == 1 ? 1 : w.size(0), D = w.size(-1);
  TORCH_CHECK(x.size(-1) == D && (P == 1 || x.size(-2) == P) && D % kLanes == 0, "x: [..., P, D], D % 8 == 0");
  const bool blocks = x.dim() == 3 && x.stride(2) == 1 && (P == 1 ? x.size(1) == 1 : x.stride(1) == D);
  if (!x.is_contiguous() && !blocks) x = x.contiguous();
  const int64_t B = x.numel() / (P * D), stride = x.is_contiguous() ? P * D : x.stride(0);
  auto y = torch::empty(x.sizes(), x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / (P * D)), [&](int64_t b0, int64_t b1) {
    rms_rows(xp, stride, wp, yp, B, P, D, static_cast<float>(eps), b0, b1);
  });
  return y;
}

// q: [H, n, hd], k, v: [KV, L, hd] (last dim contiguous), mask: [n, L] bool (last dim contiguous) or empty
// -> [H, n, hd] fp32: softmax(q k^T * scale, masked) v, grouped-query heads h reading K/V head h / (H / KV)
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  const int64_t H = q.size(0), n = q.size(1), hd = q.size(2), KV = k.size(0), L = k.size(1);
  TORCH_CHECK(KV > 0 && H % KV == 0 && k.sizes() == v.sizes() && k.size(2) == hd && hd % kLanes == 0,
              "k, v: [KV, L, hd] with H % KV == 0 and hd % 8 == 0");
  const bool masked = mask.numel() > 0;
  TORCH_CHECK(!masked || (mask.scalar_type() == torch::kBool && mask.dim() == 2 && mask.size(0) == n &&
                          mask.size(1) == L && mask.stride(1) == 1), "mask: [n, L] bool, last dim contiguous");
  auto out = torch::empty({H, n, hd}, q.options());
  const Attn a{q.data_ptr<float>(), q.stride(0), q.stride(1), k.data_ptr<float>(), k.stride(0), k.stride(1),
               v.data_ptr<float>(), v.stride(0), v.stride(1), masked ? mask.data_ptr<bool>() : nullptr,
               masked ? mask.stride(0) : 0, out.data_ptr<float>(), H, KV, n, L, hd, static_cast<float>(scale)};
  const int64_t G = H / KV;
  // one item = one query row of one K/V head; small calls run on the calling thread
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, G * L * hd));
  at::parallel_for(0, KV * n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * L);
    for (int64_t item = begin; item < end; ++item) a.row(item / n, item % n, s.data());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x^2) + eps) * w over each row; see decode_ops.cpp");
  m.def("attention", &attention, "masked softmax attention of few query rows; see decode_ops.cpp");
}
