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

float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t k = 0; k < D; k += kLanes) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  return lane_sum(acc);
}

struct Attn {
  const float* q; int64_t qs0, qs1;        // [H, n, hd]: head and row strides
  const float* k; int64_t ks0, ks1;        // [KV, L, hd]
  const float* v; int64_t vs0, vs1;        // [KV, L, hd]
  const bool* mask; int64_t ms0;           // [n, L] or null
  float* out;                              // [H, n, hd] contiguous
  int64_t H, KV, n, L, hd;
  float scale;

  // query row i of the G heads sharing K/V head kvh
  void row(int64_t kvh, int64_t i, float* s, float* acc) const {
    const int64_t G = H / KV;
    const float* kh = k + kvh * ks0;
    const float* vh = v + kvh * vs0;
    const float lowest = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < L; ++j) {
      const bool on = mask == nullptr || mask[i * ms0 + j];
      for (int64_t g = 0; g < G; ++g)
        s[g * L + j] = on ? dot(q + (kvh * G + g) * qs0 + i * qs1, kh + j * ks1, hd) * scale : lowest;
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s + g * L;
      float top = lowest;
      for (int64_t j = 0; j < L; ++j) top = std::max(top, sg[j]);
      float* a = acc + g * hd;
      for (int64_t d = 0; d < hd; ++d) a[d] = 0.0f;
      float sum = 0.0f;
      if (top != lowest) {
        for (int64_t j = 0; j < L; ++j) {
          if (sg[j] == lowest) continue;
          const float p = std::exp(sg[j] - top);
          sum += p;
          const __m256 pv = _mm256_set1_ps(p);
          const float* vj = vh + j * vs1;
          for (int64_t d = 0; d < hd; d += kLanes)
            _mm256_storeu_ps(a + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(a + d)));
        }
      }
      float* o = out + ((kvh * G + g) * n + i) * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] = sum > 0.0f ? a[d] / sum : 0.0f;
    }
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
    std::vector<float> s(G * L), acc(G * hd);
    for (int64_t item = begin; item < end; ++item) a.row(item / n, item % n, s.data(), acc.data());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x^2) + eps) * w over each row; see decode_ops.cpp");
  m.def("attention", &attention, "masked softmax attention of few query rows; see decode_ops.cpp");
}
