"""Attention through torch's fused scaled_dot_product_attention (no softcap support): `sdpa_attention` is the
portable one (what CUDA runs); `fast_attention`, the CPU kernel set's, sends few query rows (decoding, token trees)
through kernels/decode_ops.attention, one C++ call without SDPA's fixed cost, and the rest to SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from treespec.kernels import decode_ops


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, softcap: float | None = None) -> torch.Tensor:
    """Same contract as reference_attention; softcap must be None.

    q: [H, n, hd]; k, v: [KV, L, hd]; mask: [n, L] bool or None. Returns [H, n, hd].
    Grouped-query attention without copying K/V: the G = H/KV query heads of one K/V head are stacked
    as G*n query rows of that head, and the mask is repeated for each of them. Inputs get a leading batch
    dim because torch's CPU flash kernel only takes 4-D tensors (3-D falls back to the slower math path).
    """
    if softcap is not None:
        raise ValueError("sdpa_attention has no logit softcap; use reference_attention")
    heads, n, hd = q.shape
    kv = k.shape[0]
    group = heads // kv
    qg = q.reshape(kv, group * n, hd)
    m = mask if mask is None or group == 1 else mask.repeat(group, 1)  # [G*n, L]
    out = F.scaled_dot_product_attention(qg[None], k[None], v[None], attn_mask=m, scale=scale)  # [1, KV, G*n, hd]
    return out.view(heads, n, hd)


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, softcap: float | None = None) -> torch.Tensor:
    """sdpa_attention's contract; up to decode_ops.MAX_KERNEL_ROWS query rows go through the C++ kernel (every row
    computed alone: a tree's rows equal decoding's), more (and what the kernel does not take) through SDPA."""
    if softcap is not None:
        raise ValueError("fast_attention has no logit softcap; use reference_attention")
    few_rows = decode_ops.attention(q, k, v, mask, scale)
    return few_rows if few_rows is not None else sdpa_attention(q, k, v, mask, scale)
