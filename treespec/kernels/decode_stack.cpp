// A decode forward's decoder layers in one call: the block products (block_mm.h) and the glue (decode_ops.h) of
// every layer, in the order and with the calls models/layers.py makes for them one by one (its glue path with
// cached attention), so every hidden state and cache entry is the same bit for bit (tests/test_decode_stack.py).
//
// Why: after the products, the head and the glue kernels, what was left of a decode step was Python: ~40 us per
// layer of module calls, attribute lookups and argument conversion around ~10 C++ calls (kernels/decode_stack.py).
#include "block_mm.h"
#include "decode_ops.h"

namespace {

// A BlockQuantLinear (models/quant_blocks.py): y = x (scale * q - min)^T, then + bias
struct Product {
  torch::Tensor q, scale, min, bias;  // min, bias: empty when the layer has none
  int64_t group;
  torch::Tensor operator()(const torch::Tensor& x) const {
    auto y = block_mm(x, q, scale, min, group);
    return bias.numel() ? y.add_(bias) : y;
  }
};

// One decoder layer. Sandwich (Gemma 3): h = x + norm_post_attn(attn(norm_in(x))), out = h +
// norm_post_mlp(mlp(norm_mid(h))). Pre-norm (Llama, Qwen, Mistral): h = x + attn(norm_in(x)), out = h +
// mlp(norm_mid(h)); its post norms are empty.
struct Layer {
  Product qkv, o, gate_up, down;
  torch::Tensor norm_in, norm_mid, norm_post_attn, norm_post_mlp, qk_norm;  // qk_norm: [H + KV, hd] or empty
  double eps, qk_eps;
  int64_t cache_layer;  // the KV cache layer it writes
  int64_t rope;         // which RoPE table (0: full layers', 1: sliding layers')
  int64_t window;       // which of a request's masks (one per distinct attention window of the stack)
};

// One request's rows [row0, row0 + n) of the forward, its cache (kc, vc: [layers, KV, C, hd]) and the slots its
// rows go to (slot0 on); per window, the first slot its queries see and their mask over the slots from there
// (empty: every key), as models/layers.ForwardBatch.mask gives them.
struct Seq {
  int64_t row0, n, slot0;
  torch::Tensor kc, vc;
  std::vector<int64_t> first;
  std::vector<torch::Tensor> mask;
};

class Stack {
 public:
  Stack(std::vector<Layer> layers, int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, int64_t act,
        bool sandwich)
      : layers_(std::move(layers)), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), scale_(scale),
        act_(act), sandwich_(sandwich) {
    for (const Layer& L : layers_) {
      TORCH_CHECK(L.rope == 0 || L.rope == 1, "layer RoPE table out of range");
      TORCH_CHECK(L.window >= 0, "layer window index out of range");
      windows_ = std::max(windows_, L.window + 1);
    }
  }

  // x: [T, D] fp32 (the embeddings or the previous stage's output), cos, sin: per table [T, 1, hd] -> [T, D]
  torch::Tensor run(torch::Tensor x, const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                    const std::vector<Seq>& seqs) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "x: [T, D] fp32");
    TORCH_CHECK(cos.size() == 2 && sin.size() == 2, "one cos and sin table per RoPE kind");
    for (const Seq& s : seqs)
      TORCH_CHECK(static_cast<int64_t>(s.first.size()) >= windows_ && s.first.size() == s.mask.size(),
                  "a request lacks the mask of a layer's window");
    x = x.contiguous();
    const int64_t T = x.size(0);
    for (const Layer& L : layers_) {
      const auto qkv = L.qkv(rms_norm(x, L.norm_in, L.eps));
      const auto qk = qk_norm_rope(qkv, L.qk_norm, L.qk_eps, cos[L.rope], sin[L.rope], heads_ + kv_heads_);
      auto out = torch::empty({T, heads_ * head_dim_}, x.options());
      for (const Seq& s : seqs)
        cached_attention(qk, qkv, s.row0, s.n, s.kc, s.vc, L.cache_layer, s.slot0, s.first[L.window],
                         s.mask[L.window], scale_, out);
      const auto a = L.o(out);
      torch::Tensor h, z;
      if (sandwich_) {
        auto hz = residual_norm(x, a, L.norm_post_attn, L.eps, L.norm_mid);
        h = hz[0];
        z = hz[1];
      } else {
        h = x + a;
        z = rms_norm(h, L.norm_mid, L.eps);
      }
      const auto m = L.down(act_mul(L.gate_up(z), act_));
      x = sandwich_ ? residual_norm(h, m, L.norm_post_mlp, L.eps, none_)[0] : h + m;
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_;
  double scale_;
  int64_t act_;
  bool sandwich_;
  int64_t windows_ = 0;                     // masks each request must bring: one per distinct window index
  torch::Tensor none_ = torch::empty({0});  // "no second norm" for residual_norm
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<Product>(m, "Product")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t>(),
           py::arg("q"), py::arg("scale"), py::arg("min"), py::arg("bias"), py::arg("group"));
  py::class_<Layer>(m, "Layer")
      .def(py::init<Product, Product, Product, Product, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                    torch::Tensor, double, double, int64_t, int64_t, int64_t>(),
           py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("norm_in"),
           py::arg("norm_mid"), py::arg("norm_post_attn"), py::arg("norm_post_mlp"), py::arg("qk_norm"),
           py::arg("eps"), py::arg("qk_eps"), py::arg("cache_layer"), py::arg("rope"), py::arg("window"));
  py::class_<Seq>(m, "Seq")
      .def(py::init<int64_t, int64_t, int64_t, torch::Tensor, torch::Tensor, std::vector<int64_t>,
                    std::vector<torch::Tensor>>(),
           py::arg("row0"), py::arg("n"), py::arg("slot0"), py::arg("kc"), py::arg("vc"), py::arg("first"),
           py::arg("mask"));
  py::class_<Stack>(m, "Stack")
      .def(py::init<std::vector<Layer>, int64_t, int64_t, int64_t, double, int64_t, bool>(), py::arg("layers"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("act"),
           py::arg("sandwich"))
      .def("run", &Stack::run, "the layers over x [T, D]; see decode_stack.cpp");
}
