"""The one seam for device-specific kernels: a freshly loaded fp32 CPU model gets its kernel set here.

- Kernels.CPU (fp32 on the CPU, the default there): projections of 3+ rows through oneDNN-packed weights and
  of 1-2 rows through the transposed BLAS product (models/matmul.py), the LM head's exact argmax through its fbgemm
  fp16 screen (models/lm_head.py, built by `lm_head.prepare()`); weight_quantization 'blocks' / 'fp16' / 'int8'
  swap in their C++ / fbgemm products afterwards (api.py).
- Kernels.PORTABLE (what CUDA runs; selectable on the CPU so CPU tests exercise it): the model moved to its device,
  projections and embeddings in the placement's dtype through F.linear, SDPA (or the reference attention under a
  logit softcap) with the tree mask for every row count, a plain head (F.linear logits and their argmax). Norm weights and RoPE
  tables stay fp32 (layers.py rounds their results to the activations' dtype, as transformers does).

Model code never branches on the device: Linear and LMHead only know whether they were given CPU products.
"""
from __future__ import annotations

from treespec.attention import fast_attention, sdpa_attention
from treespec.device import Kernels, Placement
from treespec.models.base import CausalLM
from treespec.models.layers import Attention, Embedding, Linear, pack_linears
from treespec.models.lm_head import LMHead


def apply_kernels(model: CausalLM, placement: Placement) -> CausalLM:
    """Give `model` (fp32, CPU, weights final) the placement's kernel set, device and dtype; returns it."""
    if placement.kernels is Kernels.CPU:
        if not placement.cpu_fp32:
            raise ValueError(f"the CPU kernels run fp32 on the CPU, not {placement.describe()}")
        pack_linears(model)
        return model
    head = model.lm_head
    tied = head.weight is model.embed_tokens.weight or head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    model.to(placement.device)  # parameters and buffers (RoPE tables stay fp32)
    for m in model.modules():
        if isinstance(m, Linear):
            m.cpu_products, m.packed = False, None
            m.to(placement.dtype)
        elif isinstance(m, Embedding):
            m.to(placement.dtype)
        elif isinstance(m, Attention) and m.attend is fast_attention:
            m.attend = sdpa_attention  # no C++ few-row kernel: SDPA for every row count
    weight = model.embed_tokens.weight.detach() if tied else head.weight.to(placement.device, placement.dtype)
    model.lm_head = LMHead(weight, head.softcap, portable=True)
    return model

