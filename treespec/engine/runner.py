"""The model runner: packs prefill chunks and token trees of many requests into one flat forward.

Each request contributes either a prefill chunk (a causal chain of prompt tokens whose logits nobody needs)
or a token tree (root = last emitted token, then the draft nodes; positions = committed length + depth).
The target scores every tree node in that single forward; `TargetScores` then hands out per-node argmax, the
target's own draws, or processed probabilities (`score_trees`, one head call for the whole batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from treespec.attention.metadata import SeqAttention
from treespec.engine.request import Request
from treespec.models.head_sampler import NodeSampler
from treespec.noise import PositionNoise
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


@dataclass
class ForwardOutput:
    """Final hidden states of one forward: per tree [n, D] (scored by verification), per prefill chunk [m, D]
    (features for drafters that read the target's hidden states)."""
    trees: list[torch.Tensor]
    prefills: list[torch.Tensor]


class ModelRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def forward(self, prefills: list[PrefillChunk], trees: list[TreeWork]) -> ForwardOutput:
        """Run one target forward over every prefill chunk and tree (hidden states in that order).

        Prefill chunks are committed here; trees stay pending until the engine commits the accepted path.
        """
        tokens, positions, seqs = [], [], []
        start, prefill_rows = 0, []
        for c in prefills:
            n = c.end - c.start
            c.request.cache.reserve(n)
            tokens.append(torch.tensor(c.request.prompt_ids[c.start:c.end], dtype=torch.long))
            positions.append(torch.arange(c.start, c.end, dtype=torch.long))
            seqs.append(SeqAttention(cache=c.request.cache, start=start, n=n))
            prefill_rows.append((start, n))
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
        return ForwardOutput([hidden[s:s + n] for s, n in tree_rows], [hidden[s:s + n] for s, n in prefill_rows])


def node_histories(request: Request, tree: TokenTree) -> list[list[int]]:
    """Output tokens as seen from each node: the committed output plus the node's draft ancestors (not the root)."""
    hist: list[list[int]] = []
    toks = tree.tokens.tolist()
    for i, par in enumerate(tree.parents.tolist()):
        hist.append(list(request.output_ids) if par < 0 else hist[par] + [toks[i]])
    return hist


@dataclass
class TargetScores:
    """The target's verdict at every node of one request's tree: argmax [n] (greedy), its own draw at each
    visited node (sampling with one-hot drafts: `sampler(node)`), or probabilities p [n, V]."""
    argmax: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    sampler: NodeSampler | None = None


class HeadPath(Enum):
    """How the head scores a request's tree (cheapest that is exact for its parameters and drafts)."""
    ARGMAX = "argmax"     # greedy without penalties: the fp16 screen's certified argmax
    GUMBEL = "gumbel"     # temperature-only sampling, one-hot drafts: Gumbel-max draws through the screen
    FULL = "full"         # anything else: fp32 logits, penalties, sampling transforms, full distributions


def head_path(request: Request, tree: TokenTree) -> HeadPath:
    p = request.params
    if p.has_penalties:
        return HeadPath.FULL
    if p.greedy:
        return HeadPath.ARGMAX
    return HeadPath.GUMBEL if p.temperature_only and tree.all_one_hot() else HeadPath.FULL


def score_trees(model: torch.nn.Module, requests: list[Request], trees: list[TokenTree],
                hiddens: list[torch.Tensor], noise: list[PositionNoise]) -> list[TargetScores]:
    """Run the head once for the whole batch: one fp16 screen GEMM for every ARGMAX and GUMBEL row (when no row
    samples, the greedy rows' argmax picks its own path), full fp32 logits (then penalties and the sampling
    transforms) for the FULL ones. noise: each request's (GUMBEL rows draw with it).
    Results reach the host once per step (argmax) or once per tree (draws, probabilities): the acceptance walks
    in verify/ then read host tensors, never a device value per node."""
    paths = [head_path(r, t) for r, t in zip(requests, trees)]
    out = [TargetScores() for _ in requests]
    head = model.lm_head
    fast = [i for i, p in enumerate(paths) if p is not HeadPath.FULL]
    if fast:
        h = torch.cat([hiddens[i] for i in fast])
        # greedy rows alone: argmax picks its own path (a Q8_0 head's blocks for few rows, else the screen)
        screened = head.screen_logits(h) if any(paths[i] is HeadPath.GUMBEL for i in fast) else None
        sizes = [hiddens[i].shape[0] for i in fast]
        rows = screened.split(sizes) if screened is not None else [None] * len(fast)
        argmax = [k for k, i in enumerate(fast) if paths[i] is HeadPath.ARGMAX]  # positions within `fast`
        if argmax:
            am = head.argmax(torch.cat([hiddens[fast[k]] for k in argmax]),
                             None if screened is None else torch.cat([rows[k] for k in argmax])).cpu()
            for k, a in zip(argmax, am.split([sizes[k] for k in argmax])):
                out[fast[k]].argmax = a
        for k, i in enumerate(fast):
            if paths[i] is HeadPath.GUMBEL:
                out[i].sampler = NodeSampler(head, hiddens[i], trees[i].depth, noise[i],
                                             requests[i].params.temperature, rows[k])
    full = [i for i, p in enumerate(paths) if p is HeadPath.FULL]
    if full:
        all_logits = model.logits(torch.cat([hiddens[i] for i in full]))
        for i, logits in zip(full, all_logits.split([hiddens[i].shape[0] for i in full])):
            r, tree = requests[i], trees[i]
            if r.params.has_penalties:
                logits = apply_penalties(logits, r.params, r.prompt_ids, node_histories(r, tree))
            if r.params.greedy:
                out[i].argmax = logits.argmax(dim=-1).cpu()
            else:  # the acceptance walk reads single probabilities: on the host, one transfer per tree
                out[i].probs = logits_to_probs(logits, r.params).cpu()
    return out
