"""The output layer: exact fp32 logits, and an exact argmax that reads an fp16 copy of the head first.

Contract (work in progress: argmax currently takes the exact fp32 path; the fp16 screen follows).
"""
from __future__ import annotations

import torch


class LMHead:
    """Logits and greedy choice over a [V, D] output matrix (possibly the tied input embedding; never copied)."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None) -> None:  # weight: [V, D] fp32
        if weight.dim() != 2 or weight.dtype != torch.float32:
            raise ValueError(f"LMHead wants a 2-D fp32 weight, got {tuple(weight.shape)} {weight.dtype}")
        self.weight = weight
        self.softcap = softcap

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T, V]
        """Exact fp32 logits; mm(W, h^T) is much faster than F.linear on this CPU for small T."""
        z = torch.mm(self.weight, h.t()).t()
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def argmax(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T] long
        """Exactly logits(h).argmax(-1), lowest id on ties."""
        return self.logits(h).argmax(dim=-1)

    def rows(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # h: [T, D], ids: [T, K] -> [T, K]
        """fp32 logits of selected token ids only."""
        z = torch.bmm(self.weight[ids], h.unsqueeze(-1)).squeeze(-1)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def prepare(self) -> None:
        """Build the fast path's data ahead of the first argmax() (no-op for now)."""

    def bytes_per_step(self) -> int:
        """Weight bytes one argmax() reads."""
        return self.weight.numel() * self.weight.element_size()
