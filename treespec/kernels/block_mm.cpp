// The block kernel as its own extension (kernels/block_mm.py); the kernel itself is in block_mm.h.
#include "block_mm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_mm", &block_mm, "x @ (scale * q - min)^T in fp32; see block_mm.h");
}
