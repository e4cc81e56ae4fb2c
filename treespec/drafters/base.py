"""The drafter protocol: propose a token tree per request, observe what the target accepted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from treespec.config import DrafterConfig, DraftRequests, DraftSampling
from treespec.noise import PositionNoise
from treespec.tree.token_tree import TokenTree
from treespec.verify import VerifyResult

if TYPE_CHECKING:
    from treespec.engine.request import Request


@dataclass
class DraftRequest:
    """What a drafter gets for one request this step."""
    request: "Request"
    max_nodes: int          # draft nodes allowed (excluding the root)
    max_depth: int          # deepest draft node allowed (context length and config)
    sampling: DraftSampling  # how to pick children when the request samples (greedy requests: top-k)
    noise: PositionNoise     # this step's noise below the root (coupled drafting draws under the target's own)


class Drafter(Protocol):
    """What the engine drives: the Speculator (drafters/speculator.py), which drives each configured drafter
    through the same calls."""

    def serves(self, request: "Request") -> bool:
        """Whether it drafts for `request`."""

    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        """One tree per request, rooted at request.root_token (node 0); may be the bare root."""

    def observe(self, batch: list[DraftRequest], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        """Called after verification with what was accepted (drafter caches commit, statistics adapt)."""

    def observe_features(self, request: "Request", start: int, hidden: torch.Tensor) -> None:  # hidden: [n, D]
        """The target's hidden states of the committed positions start..start+n-1 (prefill chunks, then each
        step's accepted path); drafters that read the target's features (EAGLE heads) keep them, others ignore
        them."""

    def release(self, request: "Request") -> None:
        """The request finished (or this drafter failed on it): drop its state."""


class ConfiguredDrafter(Drafter):
    """A drafter built from one DrafterConfig; `drafter_id` (its index in SpecConfig.drafters) marks its proposals."""
    cfg: DrafterConfig
    drafter_id: int

    def serves(self, request: "Request") -> bool:
        """DrafterConfig.requests: all requests, greedy ones only or sampling ones only."""
        kind = self.cfg.requests
        return kind is DraftRequests.ALL or (kind is DraftRequests.GREEDY) == request.params.greedy
