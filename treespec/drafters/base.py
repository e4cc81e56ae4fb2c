"""The drafter protocol: propose a token tree per request, observe what the target accepted."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
    drafter_id: int
    cfg: DrafterConfig

    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        """One tree per request, rooted at request.root_token (node 0); may be the bare root."""

    def observe(self, batch: list[DraftRequest], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        """Called after verification with what was accepted (drafter caches commit, statistics adapt)."""

    def release(self, request: "Request") -> None:
        """The request finished: drop its state."""


def serves(drafter: Drafter, request: "Request") -> bool:
    """Whether `drafter` drafts for `request` (DrafterConfig.requests: all, greedy only or sampling only)."""
    kind = drafter.cfg.requests
    return kind is DraftRequests.ALL or (kind is DraftRequests.GREEDY) == request.params.greedy
