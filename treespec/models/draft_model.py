"""The draft-model interface: what drafters/model.py's ModelDrafter drives to grow token trees.

Three kinds implement it: `CausalLM` (a smaller LM sharing the target's tokenizer, its own KV cache), the
target's `LayerSkipView` (some or quantized copies of its layers, drafting on the target's own cache) and
`DraftNet` (a distilled head or SSM over a truncated vocabulary).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from treespec.attention.metadata import SeqAttention
    from treespec.kv.cache import KVCache
    from treespec.models.config import ModelConfig
    from treespec.models.truncated_head import TruncatedHead


@runtime_checkable
class DraftModel(Protocol):
    """`shares_target_cache`: the model drafts on the target's own KV cache (its tree nodes in pending slots that
    are dropped before verification) instead of a cache of its own. `truncated_head`: an output layer over a
    vocabulary subset, or None; one-hot drafts then rank their children over its ids without full-vocabulary
    rows, and coupled ones add their position's noise tail."""
    config: "ModelConfig"                   # max_position_embeddings bounds the draft context
    shares_target_cache: bool
    truncated_head: "TruncatedHead | None"

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 seqs: "list[SeqAttention]") -> torch.Tensor:
        """Hidden states [T, D] of tokens [T] at positions [T] (seqs: each request's rows, cache and mask)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [T, V] of hidden states [T, D] (-inf outside a truncated vocabulary)."""

    def new_cache(self, max_len: int) -> "KVCache":
        """An empty KV cache for one request's draft context."""
