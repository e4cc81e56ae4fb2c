"""Attention written out step by step: the oracle every fast path is tested against."""
from __future__ import annotations

import torch


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, softcap: float | None = None) -> torch.Tensor:
    """Masked softmax attention of one request; grouped-query heads share K/V.

    q: [H, n, hd]; k, v: [KV, L, hd] with H a multiple of KV (query head h reads K/V head h // (H/KV));
    mask: [n, L] bool (True = attend) or None for all visible. Returns [H, n, hd].
    softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2 style).
    """
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = q @ k.transpose(1, 2) * scale  # [H, n, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
