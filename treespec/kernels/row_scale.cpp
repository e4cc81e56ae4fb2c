// Each row of x divided by its own max |x|, for int8 activations with one scale per row (models/quant.py).
// One pass per row, single-threaded: measured ~6x faster than torch's amax + division on 1-64 rows of 640-2048,
// where each torch op pays a parallel region. The division is IEEE-rounded like torch's, so the twin in
// row_scale.py gives the same bits.
#include <torch/extension.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>

// x: [T, K] fp32 contiguous -> (x / amax [T, K], amax [T, 1]); an all-zero row gets amax = tiny
std::vector<torch::Tensor> normalize_rows(torch::Tensor x, double tiny) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: [T, K] fp32 contiguous");
  const int64_t T = x.size(0), K = x.size(1);
  auto out = torch::empty_like(x);
  auto amax = torch::empty({T, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = xp + t * K;
    float* o = op + t * K;
    __m256 m = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + k)));
    float lanes[8], a = 0.0f;
    _mm256_storeu_ps(lanes, m);
    for (float v : lanes) a = std::max(a, v);
    for (; k < K; ++k) a = std::max(a, std::fabs(row[k]));
    a = std::max(a, static_cast<float>(tiny));
    amax.data_ptr<float>()[t] = a;
    const __m256 av = _mm256_set1_ps(a);
    for (k = 0; k + 8 <= K; k += 8) _mm256_storeu_ps(o + k, _mm256_div_ps(_mm256_loadu_ps(row + k), av));
    for (; k < K; ++k) o[k] = row[k] / a;
  }
  return {out, amax};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("normalize_rows", &normalize_rows, "each row of x over its max |x|, and that max; see row_scale.cpp");
}
