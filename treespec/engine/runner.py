"""The model runner: packs prefill chunks and token trees of many requests into one flat forward.

Each request contributes either a prefill chunk (a causal chain of prompt tokens whose logits nobody needs)
or a token tree (root = last emitted token, then the draft nodes; positions = committed length + depth).
The target scores every tree node in that single forward; `TargetScores` then hands out per-node argmax
or processed probabilities on demand.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec.attention.metadata import SeqAttention
from treespec.engine.request import Request
from treespec.sampling import apply_penalties, logits_to_probs
from treespec.tree.token_tree import TokenTree


@dataclass
class PrefillChunk:
    request: Request
    start: int  # first prompt index of the chunk
    end: int    # one past the last


@dataclass
class TreeWork:
    request: Request
    tree: TokenTree


class ModelRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def forward(self, prefills: list[PrefillChunk], trees: list[TreeWork]) -> list[torch.Tensor]:
        """Run one target forward; returns the final hidden states [n, D] of each tree (in order).

        Prefill chunks are committed here; trees stay pending until the engine commits the accepted path.
        """
        tokens, positions, seqs = [], [], []
        start = 0
        for c in prefills:
            n = c.end - c.start
            c.request.cache.reserve(n)
            tokens.append(torch.tensor(c.request.prompt_ids[c.start:c.end], dtype=torch.long))
            positions.append(torch.arange(c.start, c.end, dtype=torch.long))
            seqs.append(SeqAttention(cache=c.request.cache, start=start, n=n))
            start += n
        tree_rows = []
        for w in trees:
            n, cache = w.tree.n, w.request.cache
            pos = cache.length + w.tree.depth
            cache.reserve(n, pos)
            tokens.append(w.tree.tokens)
            positions.append(pos)
            mask = w.tree.ancestor_mask() if n > 1 else None
            seqs.append(SeqAttention(cache=cache, start=start, n=n, tree_mask=mask))
            tree_rows.append((start, n))
            start += n
        hidden = self.model(torch.cat(tokens), torch.cat(positions), seqs)
        for c in prefills:
            c.request.cache.commit()
            c.request.num_prefilled = c.end
        return [hidden[s:s + n] for s, n in tree_rows]


def node_histories(request: Request, tree: TokenTree) -> list[list[int]]:
    """Output tokens as seen from each node: the committed output plus the node's draft ancestors (not the root)."""
    hist: list[list[int]] = []
    toks = tree.tokens.tolist()
    for i, par in enumerate(tree.parents.tolist()):
        hist.append(list(request.output_ids) if par < 0 else hist[par] + [toks[i]])
    return hist


def target_argmax(model: torch.nn.Module, request: Request, tree: TokenTree, hidden: torch.Tensor) -> torch.Tensor:
    """Greedy target choice at every node: [n] long. Penalties need full logits; otherwise the fast exact head."""
    params = request.params
    if not _has_penalties(params):
        return model.lm_head.argmax(hidden)
    logits = apply_penalties(model.logits(hidden), params, request.prompt_ids, node_histories(request, tree))
    return logits.argmax(dim=-1)


def target_probs(model: torch.nn.Module, request: Request, tree: TokenTree, hidden: torch.Tensor) -> torch.Tensor:
    """Processed target distribution p at every node: [n, V] (the same processing the drafters apply to q)."""
    logits = model.logits(hidden)
    if _has_penalties(request.params):
        logits = apply_penalties(logits, request.params, request.prompt_ids, node_histories(request, tree))
    return logits_to_probs(logits, request.params)


def _has_penalties(params) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)
