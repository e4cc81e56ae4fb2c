"""What a model forward needs to know about each request in a flat (ragged) batch.

A forward takes the new tokens of several requests concatenated: tokens [T], positions [T]. Request r owns
rows [start, start + n) of that batch and its own KVCache. Its queries see every committed slot of its cache
(subject to a sliding window) plus the new tokens allowed by `tree_mask` (a plain causal chain when None).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec.kv.cache import KVCache


@dataclass
class SeqAttention:
    cache: KVCache
    start: int                             # first row of this request in the flat batch
    n: int                                 # number of new tokens (queries) of this request
    tree_mask: torch.Tensor | None = None  # [n, n] bool, True where query i may see new token j (ancestors + self)

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """positions: [n] of the new tokens -> [length + n] positions of every visible key."""
        committed = torch.arange(self.cache.length, device=positions.device)
        return torch.cat([committed, positions])

    def mask(self, positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Boolean attention mask [n, length + n] for this request's queries (True = attend).

        positions: [n] positions of the new tokens. window: sliding-window size (key visible iff
        q_pos - k_pos < window), None for full attention.
        """
        n, length = self.n, self.cache.length
        new = self.tree_mask if self.tree_mask is not None else torch.ones(
            n, n, dtype=torch.bool, device=positions.device).tril()
        m = torch.cat([torch.ones(n, length, dtype=torch.bool, device=positions.device), new], dim=1)
        if window is not None:
            kpos = self.key_positions(positions)
            m = m & ((positions[:, None] - kpos[None, :]) < window)
        return m


def single(cache: KVCache, n: int, tree_mask: torch.Tensor | None = None) -> list[SeqAttention]:
    """Metadata for a batch holding one request."""
    return [SeqAttention(cache=cache, start=0, n=n, tree_mask=tree_mask)]
