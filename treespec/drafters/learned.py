"""Learned drafting: a network trained by `treespec distill` (models/draft_net.py), an EAGLE-style head over the
target's features or a small token-level SSM, both over the target's embeddings and a truncated output layer.

It drafts like ModelDrafter (its own KV cache per request, trees grown level by level for the whole batch) over
pairs: context row t reads (target feature h_t, token x_{t+1}), so the draft's context is the request's tokens
minus the first, and the last row carries the root. Tree nodes read their parent's output hidden state instead
of a target feature (the draft's guess of it). The engine hands over the target's features of every committed
position (`observe_features`: prefill chunks, then each step's accepted path); accepted nodes are therefore not
kept from the draft pass but re-read next step with the true features (EAGLE). A request whose features went
missing (a failed step) is simply not drafted by this drafter any more.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from treespec.attention.metadata import SeqAttention
from treespec.config import DrafterConfig
from treespec.drafters.base import DraftRequest
from treespec.drafters.model import DraftState, ModelDrafter
from treespec.models.draft_net import DraftNet, load_drafter
from treespec.tree.token_tree import TokenTree


@dataclass
class FeatureLog:
    """The target's hidden states [n, D] of consecutive positions from `start` on, not yet read by the draft."""
    start: int
    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + sum(r.shape[0] for r in self.rows)

    def append(self, start: int, hidden: torch.Tensor) -> bool:
        """Add rows for positions start.. (overlaps are dropped); False if they leave a gap."""
        if start > self.end:
            return False
        skip = self.end - start
        if skip < hidden.shape[0]:
            self.rows.append(hidden[skip:].clone())
        return True

    def take(self, start: int, n: int) -> torch.Tensor | None:  # -> [n, D], or None if not covered
        """Rows for positions start..start+n-1; rows before `start` are forgotten (the draft has read them)."""
        if start < self.start or start + n > self.end:
            return None
        have = torch.cat(self.rows) if len(self.rows) != 1 else self.rows[0]
        have = have[start - self.start:]
        self.rows, self.start = [have], start
        return have[:n]


class LearnedDrafter(ModelDrafter):
    """Drafts with a distilled head or SSM; a head (`needs_features`) keeps the target's hidden states it is handed."""

    def __init__(self, cfg: DrafterConfig, drafter_id: int, net: DraftNet, vocab_size: int) -> None:
        super().__init__(cfg, drafter_id, net, vocab_size)
        self.net = net
        self.needs_features = net.net_config.features
        self.keep_accepted = not self.needs_features
        self.logs: dict[str, FeatureLog] = {}

    @classmethod
    def load(cls, cfg: DrafterConfig, drafter_id: int, target: torch.nn.Module, tokenizer) -> "LearnedDrafter":
        net_cfg, tensors, vocab_ids = load_drafter(cfg.model)
        return cls(cfg, drafter_id, DraftNet(net_cfg, tensors, vocab_ids, target), target.config.vocab_size)

    # ---- protocol -------------------------------------------------------------------------------------------
    def observe_features(self, request, start: int, hidden: torch.Tensor) -> None:  # hidden: [n, D]
        """The target's hidden states at positions start..start+n-1 (committed); an SSM reads tokens only."""
        if not self.needs_features:
            return
        log = self.logs.get(request.request_id)
        if log is None:
            if start != 0:  # joined late (a reset): the context's first rows are gone for good
                return
            log = self.logs[request.request_id] = FeatureLog(0)
        if not log.append(start, hidden):
            self.release(request)

    def release(self, request) -> None:
        super().release(request)
        self.logs.pop(request.request_id, None)

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _depth(self, d: DraftRequest) -> int:
        """No draft while the context is empty (a 1-token prompt's first step: the root has no pair yet)."""
        if not self._context(d.request) or (self.needs_features and not self._covered(d.request)):
            return 0
        return super()._depth(d)

    def _covered(self, request) -> bool:
        """Whether the features the next catch-up reads (rows cache length .. root row - 1) have arrived."""
        log = self.logs.get(request.request_id)
        if log is None:
            return False
        st = self.states.get(request.request_id)
        context = len(self._context(request))
        start = 0 if st is None else min(st.cache.length, context - 1)
        return log.start <= start and log.end >= context

    def _context(self, request) -> list[int]:
        return request.all_ids[1:]

    def _chain_features(self, request, start: int, n: int) -> torch.Tensor | None:
        if not self.needs_features:
            return None
        rows = self.logs[request.request_id].take(start, n)
        if rows is None:
            raise RuntimeError(f"features of positions {start}..{start + n - 1} are missing")
        return rows

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention],
             features: torch.Tensor | None) -> torch.Tensor:
        return self.net(tokens, positions, seqs, features=features)

    def _tree_features(self, state: DraftState, tree: TokenTree, nodes: list[int]) -> torch.Tensor | None:
        if not self.needs_features:
            return None
        return torch.stack([state.out[int(tree.parents[u])] for u in nodes])
