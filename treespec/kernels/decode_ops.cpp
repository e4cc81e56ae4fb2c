// The decode ops as their own extension (kernels/decode_ops.py); the ops themselves are in decode_ops.h.
#include "decode_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "x / sqrt(mean(x^2) + eps) * w over each row; see decode_ops.h");
  m.def("attention", &attention, "masked softmax attention of few query rows; see decode_ops.h");
  m.def("qk_norm_rope", &qk_norm_rope, "q/k heads of a fused q/k/v, normed and rotated; see decode_ops.h");
  m.def("cached_attention", &cached_attention, "one request's K/V write and attention; see decode_ops.h");
  m.def("residual_norm", &residual_norm, "x + rms_norm(y), and its own norm; see decode_ops.h");
  m.def("act_mul", &act_mul, "act(gate) * up of a fused gate/up; see decode_ops.h");
}
