"""Attention kernels for one request's queries over its visible K/V, and the choice between them."""
from __future__ import annotations

from enum import Enum
from typing import Callable

import torch

from treespec.attention.reference import reference_attention
from treespec.attention.sdpa import fast_attention, sdpa_attention

# (q [H, n, hd], k [KV, L, hd], v [KV, L, hd], mask [n, L] | None, scale, softcap) -> [H, n, hd]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, float | None],
                       torch.Tensor]


class AttentionBackend(str, Enum):
    REFERENCE = "reference"
    SDPA = "sdpa"


def select_attention(backend: AttentionBackend | None, softcap: float | None) -> AttentionFn:
    """The kernel for a layer: `backend` if given, else SDPA unless a logit softcap needs the reference. SDPA is
    the CPU kernel set's fast_attention; models/device_kernels.py swaps in plain sdpa_attention for the portable set."""
    if backend is None:
        backend = AttentionBackend.REFERENCE if softcap is not None else AttentionBackend.SDPA
    if backend is AttentionBackend.SDPA and softcap is not None:
        raise ValueError("the SDPA attention backend cannot apply an attention logit softcap")
    return reference_attention if backend is AttentionBackend.REFERENCE else fast_attention


__all__ = ["AttentionBackend", "AttentionFn", "fast_attention", "reference_attention", "sdpa_attention",
           "select_attention"]
