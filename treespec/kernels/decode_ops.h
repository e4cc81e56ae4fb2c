// The small per-row ops of a decode step, one call each: RMSNorm, attention of a few query rows, and the glue of a
// decoder layer (q/k norm + RoPE, K/V write + attention, residual + norms, activation * up).
//
// Why: torch's F.rms_norm runs as ~7 small ops on CPU and its fused attention allocates and tiles for large
// problems; at one row (decoding) or a few (a token tree) their fixed cost per call was most of the step's
// non-matmul time (models/layers.py, measured there).
//
// Exactness: every output row is computed on its own, in one fixed order (8-lane FMA chains over the row, the
// lanes summed in a fixed order, keys in ascending order), whatever the number of rows, the tile or the
// thread: a row's result never depends on the other rows of the call (lossless speculation). fp32 throughout.
#pragma once
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
  float* out; int64_t os0, os1;            // [H, n, hd] or [n, H, hd]: head and row strides
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

  // Phase 1: query row i of heads [h0, h1) against keys [j0, j1), scaled, masked keys -inf, into
  // s[(h * n + i) * L + j]. A block of keys is read once for the heads.
  void scores(int64_t i, int64_t h0, int64_t h1, int64_t j0, int64_t j1, float* s) const {
    const int64_t G = H / KV;
    auto query = [&](int64_t h) { return q + h * qs0 + i * qs1; };
    auto key = [&](int64_t h, int64_t j) { return k + h / G * ks0 + j * ks1; };
    auto score = [&](int64_t h, int64_t j) { return s + (h * n + i) * L + j; };
    int64_t j = j0;
    for (; j + kKeys <= j1; j += kKeys)
      for (int64_t h = h0; h < h1; ++h) dots<kKeys>(query(h), key(h, j), score(h, j));
    for (; j < j1; ++j)
      for (int64_t h = h0; h < h1; ++h) dots<1>(query(h), key(h, j), score(h, j));
    const float lowest = -std::numeric_limits<float>::infinity();
    for (int64_t h = h0; h < h1; ++h) {
      float* sh = s + (h * n + i) * L;
      for (j = j0; j < j1; ++j) sh[j] = mask == nullptr || mask[i * ms0 + j] ? sh[j] * scale : lowest;
    }
  }

  // Phase 2: one row's scores sg [L] -> its softmax weights in place; false when every key is masked
  bool weights(float* sg, float* sum) const {
    const float lowest = -std::numeric_limits<float>::infinity();
    float top = lowest;
    for (int64_t j = 0; j < L; ++j) top = std::max(top, sg[j]);
    if (top == lowest) return false;
    *sum = softmax_weights(sg, top);
    return true;
  }

  // Phase 3: columns [c0, c0 + 64) (or to hd) of head h's row i from its weights p (all masked: zeros)
  void values(int64_t h, int64_t i, int64_t c0, const float* p, float sum, bool any) const {
    float* o = out + h * os0 + i * os1 + c0;
    const int64_t c1 = std::min<int64_t>(hd, c0 + 8 * kLanes);
    if (!any) {
      for (int64_t d = 0; d < c1 - c0; ++d) o[d] = 0.0f;
      return;
    }
    const float* v0 = v + h / (H / KV) * vs0 + c0;
    if (c1 - c0 == 8 * kLanes) return value_columns<8>(p, v0, o, sum);
    for (int64_t c = 0; c < c1 - c0; c += kLanes) value_columns<1>(p, v0 + c, o + c, sum);
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

  // C * 8 columns of o = sum_j p[j] v[j] / sum, keys in ascending order per element (C a constant, so the
  // accumulators live in registers)
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

// Every query row of every head through the three phases, which do the arithmetic a row alone would do. Up to
// kSplitFromKeys keys one item is one head's row (all three phases on one thread); from there the phases run
// one after the other, split by blocks of keys (scores) and of 64 columns (values). Why: a decode step's one row
// of 4 heads over ~700 keys was one head per thread, each thread streaming all of K and V (~15 GB/s a thread);
// split, each reads half (18 layers at 700 keys, one row: ~3 -> ~1.3 ms), while on short rows the extra
// parallel regions cost more than they save. Small calls run on the calling thread (every range within its grain).
constexpr int64_t kSplitFromKeys = 256;

void run(const Attn& a) {
  constexpr int64_t kKeyBlock = 64, kColumns = 8 * kLanes;
  const int64_t rows = a.H * a.n, column_blocks = (a.hd + kColumns - 1) / kColumns;
  std::vector<float> s(rows * a.L), sums(rows);
  std::vector<char> any(rows);
  if (a.L < kSplitFromKeys) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.L * a.hd));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = r / a.n, i = r % a.n;
        a.scores(i, h, h + 1, 0, a.L, s.data());
        any[r] = a.weights(s.data() + r * a.L, &sums[r]);
        for (int64_t c = 0; c < column_blocks; ++c) a.values(h, i, c * kColumns, s.data() + r * a.L, sums[r], any[r]);
      }
    });
    return;
  }
  const int64_t blocks = (a.L + kKeyBlock - 1) / kKeyBlock;
  const int64_t score_grain = std::max<int64_t>(1, 32768 / (a.H * kKeyBlock * a.hd));
  at::parallel_for(0, a.n * blocks, score_grain, [&](int64_t b0, int64_t b1) {
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t j0 = item % blocks * kKeyBlock;
      a.scores(item / blocks, 0, a.H, j0, std::min(a.L, j0 + kKeyBlock), s.data());
    }
  });
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / a.L), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) any[r] = a.weights(s.data() + r * a.L, &sums[r]);
  });
  const int64_t value_grain = std::max<int64_t>(1, 32768 / (a.L * kColumns));
  at::parallel_for(0, column_blocks * rows, value_grain, [&](int64_t c0, int64_t c1) {
    for (int64_t item = c0; item < c1; ++item) {  // column blocks outermost: a thread reads its columns of V
      const int64_t r = item % rows;
      a.values(r / a.n, r % a.n, item / rows * kColumns, s.data() + r * a.L, sums[r], any[r]);
    }
  });
}

// y = x cos + rot(x) sin with rot(x)[i] = x[i + hd/2] (i < hd/2), x[i - hd/2] (else): RoPE pairing dim i with
// i + hd/2 as models/layers.apply_rope does, rounded as its torch.addcmul(x * cos, roll(x), sin) rounds on this
// CPU (x cos rounded, then one fused multiply-add; tests check it bit for bit). hd % 16 == 0
void rope_row(const float* x, const float* cos, const float* sin, float* y, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; i += kLanes) {
    const int64_t j = i < half ? i + half : i - half;
    const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(cos + i));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(sin + i), a));
  }
}

void check_matrix(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 2 && t.stride(1) == 1, what, ": 2-D fp32, rows contiguous");
}

void check_rows(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.dim() == 3 && t.stride(2) == 1, what, ": 3-D fp32, last dim contiguous");
}

}  // namespace

// x: [..., D] fp32 with w: [D], or [..., P, D] with w: [P, D] (one weight row per head) -> x's shape, contiguous.
// x contiguous, or 3-D with each [P, D] block contiguous and the blocks strided (q/k heads of a fused q/k/v).
inline torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
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
inline torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
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
               masked ? mask.stride(0) : 0, out.data_ptr<float>(), n * hd, hd, H, KV, n, L, hd,
               static_cast<float>(scale)};
  run(a);
  return out;
}

// The glue of a decoder layer, one call each where torch runs several small ops (models/layers.py uses them).

// qkv: [T, W] fp32 (rows contiguous; q heads then K/V heads from column 0), w: [P, hd] per-head norm weights or
// empty, cos, sin: [T, hd] (RotaryTable rows) -> [T, P, hd]: the first P = H + KV heads of each row, RMS-normed
// with w (when given) as rms_norm does, then rotated (rope_row)
inline torch::Tensor qk_norm_rope(torch::Tensor qkv, torch::Tensor w, double eps, torch::Tensor cos, torch::Tensor sin,
                           int64_t P) {
  check_matrix(qkv, "qkv");
  const int64_t T = qkv.size(0), hd = cos.size(-1);
  TORCH_CHECK(hd % (2 * kLanes) == 0 && P * hd <= qkv.size(1), "qkv: [T, >= P hd], hd % 16 == 0");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == T * hd && sin.numel() == T * hd, "cos, sin: [T, hd] fp32");
  const bool norm = w.numel() > 0;
  TORCH_CHECK(!norm || (w.scalar_type() == torch::kFloat && w.is_contiguous() && w.numel() == P * hd), "w: [P, hd]");
  auto out = torch::empty({T, P, hd}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* wp = norm ? w.data_ptr<float>() : nullptr;
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs = qkv.stride(0);
  at::parallel_for(0, T * P, std::max<int64_t>(1, 65536 / hd), [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(hd);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / P, p = item % P;
      const float* x = xp + t * xs + p * hd;
      if (norm) rms_rows(x, 0, wp + p * hd, tmp.data(), 1, 1, hd, static_cast<float>(eps), 0, 1);
      rope_row(norm ? tmp.data() : x, cp + t * hd, sp + t * hd, op + item * hd, hd);
    }
  });
  return out;
}

// One request's part of a forward: its rows [row0, row0 + n) write K (from qk, heads H..H+KV-1) and V (from qkv,
// columns (H + KV) hd on) into cache slots [slot0, slot0 + n) of layer `layer` (kc, vc: [layers, KV, C, hd]
// contiguous), then their queries (qk heads 0..H-1) attend over slots [first, slot0 + n) under mask ([n, L] bool,
// or empty: every key) into out rows [row0, row0 + n) ([T, H hd]): the heads side by side, as o_proj reads them.
inline void cached_attention(torch::Tensor qk, torch::Tensor qkv, int64_t row0, int64_t n, torch::Tensor kc,
                      torch::Tensor vc, int64_t layer, int64_t slot0, int64_t first, torch::Tensor mask,
                      double scale, torch::Tensor out) {
  check_rows(qk, "qk");
  check_matrix(qkv, "qkv");
  check_matrix(out, "out");
  TORCH_CHECK(qk.is_contiguous() && out.is_contiguous(), "qk, out: contiguous");
  TORCH_CHECK(kc.scalar_type() == torch::kFloat && kc.dim() == 4 && kc.is_contiguous() && vc.is_contiguous() &&
              kc.sizes() == vc.sizes() && vc.scalar_type() == torch::kFloat, "kc, vc: [layers, KV, C, hd] fp32");
  const int64_t T = qk.size(0), P = qk.size(1), hd = qk.size(2), KV = kc.size(1), C = kc.size(2), H = P - KV;
  const int64_t L = slot0 + n - first;
  TORCH_CHECK(kc.size(3) == hd && H > 0 && H % KV == 0 && hd % kLanes == 0 && qkv.size(0) == T &&
              qkv.size(1) >= (P + KV) * hd && out.size(0) == T && out.size(1) == H * hd, "qk, qkv, out shapes");
  TORCH_CHECK(0 <= layer && layer < kc.size(0) && 0 <= row0 && n > 0 && row0 + n <= T && 0 <= first &&
              first <= slot0 && slot0 + n <= C, "rows, slots or layer out of range");
  const bool masked = mask.numel() > 0;
  TORCH_CHECK(!masked || (mask.scalar_type() == torch::kBool && mask.dim() == 2 && mask.size(0) == n &&
                          mask.size(1) == L && mask.stride(1) == 1), "mask: [n, L] bool, last dim contiguous");
  float* k = kc.data_ptr<float>() + layer * KV * C * hd;
  float* v = vc.data_ptr<float>() + layer * KV * C * hd;
  const float* q = qk.data_ptr<float>() + row0 * P * hd;
  const float* vsrc = qkv.data_ptr<float>() + row0 * qkv.stride(0) + P * hd;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t h = 0; h < KV; ++h) {
      std::copy_n(q + (i * P + H + h) * hd, hd, k + (h * C + slot0 + i) * hd);
      std::copy_n(vsrc + i * qkv.stride(0) + h * hd, hd, v + (h * C + slot0 + i) * hd);
    }
  const Attn a{q, hd, P * hd, k + first * hd, C * hd, hd, v + first * hd, C * hd, hd,
               masked ? mask.data_ptr<bool>() : nullptr, masked ? mask.stride(0) : 0,
               out.data_ptr<float>() + row0 * H * hd, hd, H * hd, H, KV, n, L, hd, static_cast<float>(scale)};
  run(a);
}

// h = x + rms_norm(y, w), and rms_norm(h, w2) when w2 is given (x, y: [T, D] contiguous; w, w2: [D]): a post-norm
// residual and the next pre-norm, rounded as the separate ops round them -> [h] or [h, z]
inline std::vector<torch::Tensor> residual_norm(torch::Tensor x, torch::Tensor y, torch::Tensor w, double eps,
                                         torch::Tensor w2) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat && x.dim() == 2 &&
              x.is_contiguous() && y.is_contiguous() && x.sizes() == y.sizes(), "x, y: [T, D] fp32 contiguous");
  const int64_t T = x.size(0), D = x.size(1);
  const bool second = w2.numel() > 0;
  for (const auto& t : {w, w2})
    TORCH_CHECK(t.numel() == 0 || (t.scalar_type() == torch::kFloat && t.is_contiguous() && t.numel() == D),
                "w, w2: [D] fp32");
  TORCH_CHECK(w.numel() == D && D % kLanes == 0, "w: [D], D % 8 == 0");
  auto h = torch::empty_like(x);
  auto z = second ? torch::empty_like(x) : torch::Tensor();
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / D), [&](int64_t t0, int64_t t1) {
    rms_rows(yp, D, wp, hp, T, 1, D, static_cast<float>(eps), t0, t1);
    for (int64_t i = t0 * D; i < t1 * D; i += kLanes)
      _mm256_storeu_ps(hp + i, _mm256_add_ps(_mm256_loadu_ps(xp + i), _mm256_loadu_ps(hp + i)));
    if (second) rms_rows(hp, D, w2.data_ptr<float>(), z.data_ptr<float>(), T, 1, D, static_cast<float>(eps), t0, t1);
  });
  return second ? std::vector<torch::Tensor>{h, z} : std::vector<torch::Tensor>{h};
}

// 1 / (1 + e^-z) for 8 lanes, through exp8 of -|z| only (no overflow, no cancellation): e / (1 + e) below 0
inline __m256 sigmoid8(__m256 z) {
  const __m256 e = exp8(_mm256_or_ps(z, _mm256_set1_ps(-0.0f)));  // e^-|z|
  const __m256 one = _mm256_set1_ps(1.0f), d = _mm256_add_ps(one, e);
  return _mm256_blendv_ps(_mm256_div_ps(one, d), _mm256_div_ps(e, d), z);  // z's sign bit picks e / (1 + e)
}

// gate_up: [T, 2 I] rows contiguous -> act(gate) * up, [T, I]. act 0: SiLU x sigmoid(x); 1: GELU's tanh form,
// 0.5 x (1 + tanh(u)) = x sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3); both within a few ulp of torch's (tests),
// computed alone per element. act 2 (GELU with erf) goes through torch's own gelu.
inline torch::Tensor act_mul(torch::Tensor gate_up, int64_t act) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && 0 <= act && act <= 2, "gate_up: [T, 2 I]; act 0-2");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  if (act == 2 || I % kLanes || gate_up.scalar_type() != torch::kFloat || gate_up.stride(1) != 1) {
    const auto gate = gate_up.narrow(1, 0, I);
    auto g = act == 0 ? at::silu(gate) : at::gelu(gate, act == 1 ? "tanh" : "none");
    return g.mul_(gate_up.narrow(1, I, I));
  }
  auto out = torch::empty({T, I}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t gs = gate_up.stride(0);
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / I), [&](int64_t t0, int64_t t1) {
    const __m256 k0 = _mm256_set1_ps(2.0f * 0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < I; i += kLanes) {
        const __m256 x = _mm256_loadu_ps(gp + t * gs + i), up = _mm256_loadu_ps(gp + t * gs + I + i);
        const __m256 x3 = _mm256_mul_ps(x, _mm256_mul_ps(x, x));
        const __m256 z = act == 0 ? x : _mm256_mul_ps(k0, _mm256_add_ps(x, _mm256_mul_ps(k1, x3)));
        _mm256_storeu_ps(op + t * I + i, _mm256_mul_ps(_mm256_mul_ps(x, sigmoid8(z)), up));
      }
  });
  return out;
}
