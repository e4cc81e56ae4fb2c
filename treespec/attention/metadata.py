"""What a model forward needs to know about each request in a flat (ragged) batch.

A forward takes the new tokens of several requests concatenated: tokens [T], positions [T]. Request r owns
rows [start, start + n) of that batch and its own KVCache. Its queries see every committed slot of its cache
(subject to a sliding window) plus the pending slots allowed by `tree_mask` (a plain causal chain when None).
The pending slots are this forward's n tokens, after any pending slots of earlier forwards (a drafter that
grows a tree level by level); usually there are none of those and the pending slots are exactly the n.
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
    tree_mask: torch.Tensor | None = None  # [n, pending] bool, query i may see pending slot j (ancestors + self)

    def mask(self, positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Boolean attention mask [n, length + pending] for this request's queries (True = attend).

        positions: [n] positions of the new tokens. window: sliding-window size (key visible iff
        q_pos - k_pos < window), None for full attention. Call after cache.reserve(n).
        """
        n, length, pending = self.n, self.cache.length, self.cache.pending
        dev = positions.device
        if self.tree_mask is not None:
            new = self.tree_mask.to(dev)  # built on the host by the tree; a no-op on the CPU
        else:  # a chain continuing after any earlier pending slots
            new = torch.ones(n, pending, dtype=torch.bool, device=dev).tril(pending - n)
        m = torch.cat([torch.ones(n, length, dtype=torch.bool, device=dev), new], dim=1)
        if window is not None:
            kpos = self.cache.pos[: length + pending]
            m = m & ((positions[:, None] - kpos[None, :]) < window)
        return m


def single(cache: KVCache, n: int, tree_mask: torch.Tensor | None = None) -> list[SeqAttention]:
    """Metadata for a batch holding one request."""
    return [SeqAttention(cache=cache, start=0, n=n, tree_mask=tree_mask)]
