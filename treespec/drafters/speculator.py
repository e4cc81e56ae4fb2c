"""The speculator: every configured drafter behind the one Drafter the engine drives.

Its jobs are the drafters' shared bookkeeping, kept out of the engine loop: route each request to the drafters
that serve it (DrafterConfig.requests), merge their trees (tree/build.py `merge_trees`: every proposal kept, in
drafter order), hand the target's hidden states to them (`observe_features`), and isolate their failures.
Speculation is optional: a drafter that raises is logged and drops the requests it was handling (it rebuilds
their state from the request when it drafts them again); they get the other drafters' trees, or plain root-only
trees, and the other drafters carry on.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from treespec.drafters.base import ConfiguredDrafter, Drafter, DraftRequest
from treespec.tree.build import merge_trees
from treespec.tree.token_tree import TokenTree
from treespec.verify import VerifyResult

if TYPE_CHECKING:
    from treespec.engine.request import Request

log = logging.getLogger(__name__)


class Speculator(Drafter):
    def __init__(self, drafters: list[ConfiguredDrafter]) -> None:
        self.drafters = drafters
        self._routes: list[list[int]] = []  # per drafter: the positions in this step's batch it proposed for

    def serves(self, request: "Request") -> bool:
        return any(d.serves(request) for d in self.drafters)

    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        """Each drafter proposes for the requests it serves; a request's trees are merged (none: its bare root)."""
        proposed: list[list[TokenTree]] = [[] for _ in batch]
        self._routes = []
        for d in self.drafters:
            ks = [k for k, b in enumerate(batch) if d.serves(b.request)]
            if ks:
                try:
                    trees = d.propose([batch[k] for k in ks])
                except Exception as e:  # noqa: BLE001 - those requests go without this drafter's trees
                    self._failed(d, "propose", e, [batch[k].request for k in ks])
                    ks = []
                else:
                    for k, tree in zip(ks, trees):
                        proposed[k].append(tree)
            self._routes.append(ks)
        return [TokenTree.root(b.request.root_token) if not trees else trees[0] if len(trees) == 1
                else merge_trees(trees) for b, trees in zip(batch, proposed)]

    def observe(self, batch: list[DraftRequest], trees: list[TokenTree], results: list[VerifyResult]) -> None:
        """Each drafter observes the verified trees (merged, pruned) of the requests it proposed for."""
        for d, ks in zip(self.drafters, self._routes):
            if ks:
                try:
                    d.observe([batch[k] for k in ks], [trees[k] for k in ks], [results[k] for k in ks])
                except Exception as e:  # noqa: BLE001 - drafter state is rebuilt from the request next step
                    self._failed(d, "observe", e, [batch[k].request for k in ks])
        self._routes = []

    def observe_features(self, request: "Request", start: int, hidden: torch.Tensor) -> None:  # hidden: [n, D]
        for d in self.drafters:
            if d.serves(request):
                try:
                    d.observe_features(request, start, hidden)
                except Exception as e:  # noqa: BLE001 - that drafter just stops drafting this request
                    self._failed(d, "feature update", e, [request])

    def release(self, request: "Request") -> None:
        for d in self.drafters:
            d.release(request)

    @staticmethod
    def _failed(drafter: ConfiguredDrafter, phase: str, error: Exception, requests: list["Request"]) -> None:
        log.warning("drafter %d: %s failed, dropping its state of %d request(s): %s",
                    drafter.drafter_id, phase, len(requests), error)
        for r in requests:
            drafter.release(r)
