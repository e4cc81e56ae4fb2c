// Each row's K best (value, id) over a head's vocabulary without writing its logits: what the fused greedy heads
// (q8_head.cpp, bf16_screen.cpp) share. The vocabulary is cut into a fixed number of slices (not one per thread),
// each keeping its own top-K, then merged in slice order, so the answer is the same with any thread count.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <limits>
#include <vector>

constexpr int64_t kSlices = 256;  // vocabulary slices, each with its own top-K (fixed: thread-independent)

// A row's K best values so far, best first. Offered in increasing id order, an equal value goes after the ones
// kept before it, so the list is ordered by (value descending, id ascending), like a stable sort.
struct TopK {
  float* val;
  int64_t* id;
  int k;

  void offer(float v, int64_t n) const {
    if (!(v > val[k - 1])) return;  // also drops NaN
    int i = k - 1;
    while (i > 0 && v > val[i - 1]) { val[i] = val[i - 1]; id[i] = id[i - 1]; --i; }
    val[i] = v; id[i] = n;
  }
};

// Slice s of N ids in tiles of `tile` rows: the boundaries are multiples of the tile, whatever the threads.
inline int64_t slice_start(int64_t s, int64_t N, int64_t tile) {
  const int64_t tiles = (N + tile - 1) / tile;
  return std::min(N, tiles * s / kSlices * tile);
}

// A tile's values out[t][r] (T rows, weight rows n0..n0+nr, W columns kept per row) into y [T, N] when given,
// else offered to each row's TopK at val / id [T, k]: the end of every head kernel's slice()
template <int W>
void keep_tile(const float (*out)[W], int64_t T, int64_t n0, int64_t nr, int64_t N, float* y, float* val,
               int64_t* id, int k) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < nr; ++r) {
      if (y) y[t * N + n0 + r] = out[t][r];
      else TopK{val + t * k, id + t * k, k}.offer(out[t][r], n0 + r);
    }
}

// What the fused heads share: a head kernel H (fields T, N: activation and vocabulary rows; a method
// slice(n_begin, n_end, y, val, id, k) that writes ids [n_begin, n_end)'s values into y [T, N], or else offers them
// to each row's TopK at val / id [T, k]) over slices whole in tiles of `tile` rows.

// -> [T, N] fp32: every value (tests, benchmarks, a row the top-k cannot settle)
template <class H>
torch::Tensor all_values(const H& h, int64_t tile) {
  torch::Tensor y = torch::empty({h.T, h.N}, torch::TensorOptions().dtype(torch::kFloat));
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, kSlices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      h.slice(slice_start(s, h.N, tile), slice_start(s + 1, h.N, tile), yp, nullptr, nullptr, 0);
  });
  return y;
}

// -> ([T, k] fp32 values best first, [T, k] int64 ids). Of equal values only the lowest id is kept; slots never
// filled (k > N, or NaN values) hold -inf and id -1.
template <class H>
std::vector<torch::Tensor> top_values(const H& h, int64_t tile, int64_t k) {
  TORCH_CHECK(k >= 1 && k <= 64, "k in 1..64");
  const int64_t T = h.T;
  const float lowest = -std::numeric_limits<float>::infinity();
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat);
  auto part_val = torch::full({kSlices, T, k}, lowest, fp32);
  auto part_id = torch::full({kSlices, T, k}, -1, fp32.dtype(torch::kLong));
  float* pv = part_val.data_ptr<float>();
  int64_t* pi = part_id.data_ptr<int64_t>();
  at::parallel_for(0, kSlices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      h.slice(slice_start(s, h.N, tile), slice_start(s + 1, h.N, tile), nullptr, pv + s * T * k, pi + s * T * k,
              static_cast<int>(k));
  });
  auto val = torch::full({T, k}, lowest, fp32);
  auto id = torch::full({T, k}, -1, fp32.dtype(torch::kLong));
  for (int64_t t = 0; t < T; ++t) {  // slices in vocabulary order: ties keep the lowest id
    const TopK best{val.data_ptr<float>() + t * k, id.data_ptr<int64_t>() + t * k, static_cast<int>(k)};
    for (int64_t s = 0; s < kSlices; ++s)
      for (int64_t i = 0; i < k && pi[(s * T + t) * k + i] >= 0; ++i)
        best.offer(pv[(s * T + t) * k + i], pi[(s * T + t) * k + i]);
  }
  return {val, id};
}
