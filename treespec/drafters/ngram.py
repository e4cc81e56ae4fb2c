"""N-gram drafting: prompt lookup plus hierarchical databases (HD), highest locality first.

Databases, searched in order until enough continuations are found: (1) the request's own context (prompt and
output), (2) text the engine generated for earlier requests, (3) an optional static corpus. For the longest
suffix of the context (prompt_lookup_max down to prompt_lookup_min tokens) that occurs earlier, the tokens
that followed each occurrence (most recent first) are continuations; distinct ones are merged into a trie.
Drafts are deterministic (q is one-hot). A node's score estimates its acceptance probability: its parent's score
times the share of the parent's continuations through it times the rate at which some child of a node is right
given the node is, observed per *match length*: the context tokens the children's prediction rests on (the
longest suffix match among them plus the drafted tokens above). That length predicts acceptance far better than
depth does (Spec-Bench outputs, Gemma 3 270M: ~0.4 after one matched token, ~0.64 after three, ~0.96 from five).

The rates are learned from every drafted trie before the cost model prunes it, checked against the text the
target went on to generate (`_Pending`). Learning only from the verified trees would never observe the nodes the
cost model cut, so rates that start low would keep the trees shallow for good.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from treespec.config import DrafterConfig
from treespec.drafters.base import ConfiguredDrafter, DraftRequest
from treespec.errors import ConfigError
from treespec.tree.token_tree import DraftKind, Proposal, TokenTree

_MAX_GLOBAL_TOKENS = 200_000  # database (2): bounded memory of earlier generations
_RATE_WINDOW = 10  # a rate is the mean of its first observations, then a moving average over ~this many
_MAX_MATCH = 16  # match lengths from here on share one rate


class NgramIndex:
    """n-gram -> end positions of its occurrences in one token sequence, updated as tokens are appended."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.table: dict[tuple[int, ...], list[int]] = defaultdict(list)

    def extend(self, new: list[int]) -> None:
        toks = self.tokens
        for t in new:
            toks.append(t)
            end = len(toks)
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.table[tuple(toks[end - n:end])].append(end)

    def continuations(self, suffix: list[int], depth: int, limit: int) -> list[tuple[list[int], int]]:
        """Up to `limit` distinct (continuation, match length) pairs: longest suffix match first, then the most
        recent occurrence first. Shorter matches add alternative branches that the cost model may keep."""
        found: list[tuple[list[int], int]] = []
        seen: set[tuple[int, ...]] = set()
        for n in range(min(self.n_max, len(suffix)), self.n_min - 1, -1):
            for end in reversed(self.table.get(tuple(suffix[-n:]), ())):
                cont = self.tokens[end:end + depth]
                if cont and tuple(cont) not in seen:
                    seen.add(tuple(cont))
                    found.append((cont, n))
                    if len(found) >= limit:
                        return found
        return found


@dataclass
class _Pending:
    """A drafted trie (unpruned) waiting for the text it predicted: walked along the request's tokens as they
    arrive; each node reached (its path right so far) with children is one observation of its match length's
    rate: one of them is right, or none."""
    start: int  # index in the request's tokens of what the depth-1 nodes predict
    kids: list[dict[int, int]]  # per trie node: token -> child node
    match: list[int]  # per trie node: the match length its children rest on (the key of their rate)
    node: int = 0  # how far the walk has matched
    depth: int = 0


class NgramDrafter(ConfiguredDrafter):
    def __init__(self, cfg: DrafterConfig, drafter_id: int, tokenizer=None) -> None:
        self.cfg, self.drafter_id = cfg, drafter_id
        self.own: dict[str, NgramIndex] = {}
        self.generated = NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        self.corpus: NgramIndex | None = None
        if cfg.corpus:
            self.corpus = _load_corpus(Path(cfg.corpus), tokenizer, cfg)
        self.match_rate = [0.5] * (_MAX_MATCH + 1)  # P(a child right | node right) by match length, running
        self.match_seen = [0] * (_MAX_MATCH + 1)  # observations behind each rate
        self.pending: dict[str, list[_Pending]] = {}  # request -> its tries still awaiting their text

    # ---- protocol -------------------------------------------------------------------------------------------
    def propose(self, batch: list[DraftRequest]) -> list[TokenTree]:
        return [self._propose_one(d) for d in batch]

    def release(self, request) -> None:
        self.own.pop(request.request_id, None)
        self.pending.pop(request.request_id, None)
        if request.finished and request.output_ids:  # what the engine generated joins database (2), once
            self._remember(request.all_ids)

    # ---- internals ------------------------------------------------------------------------------------------
    def _propose_one(self, d: DraftRequest) -> TokenTree:
        r = d.request
        if d.max_depth <= 0 or d.max_nodes <= 0:
            return TokenTree.root(r.root_token)
        idx = self.own.get(r.request_id)
        if idx is None:
            idx = self.own[r.request_id] = NgramIndex(self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)
        ctx = r.all_ids
        self._learn(r.request_id, ctx)
        idx.extend(ctx[len(idx.tokens):])
        depth = min(d.max_depth, self.cfg.num_speculative_tokens)
        limit = self.cfg.max_continuations
        conts = idx.continuations(ctx, depth, limit)
        for db in (self.generated, self.corpus):
            if len(conts) >= limit or db is None:
                break
            have = {tuple(c) for c, _ in conts}
            conts += [(c, n) for c, n in db.continuations(ctx, depth, limit - len(conts)) if tuple(c) not in have]
        tree, kids, match = self._trie(r.root_token, conts, d.max_nodes)
        if tree.n > 1:
            self.pending.setdefault(r.request_id, []).append(_Pending(len(ctx), kids, match))
        return tree

    def _learn(self, request_id: str, ids: list[int]) -> None:
        """Walk the request's pending tries along its tokens so far; a trie is done at its first miss or leaf."""
        waiting = []
        for p in self.pending.get(request_id, ()):
            while p.kids[p.node] and p.start + p.depth < len(ids):
                child = p.kids[p.node].get(ids[p.start + p.depth])
                self._observe(p.match[p.node], child is not None)
                if child is None:
                    break
                p.node, p.depth = child, p.depth + 1
            else:
                if p.kids[p.node]:  # the text has not reached its next depth yet
                    waiting.append(p)
        self.pending[request_id] = waiting

    def _observe(self, m: int, hit: bool) -> None:
        self.match_seen[m] += 1
        self.match_rate[m] += (float(hit) - self.match_rate[m]) / min(self.match_seen[m] + 1, _RATE_WINDOW)

    def _trie(self, root: int, conts: list[tuple[list[int], int]],
              max_nodes: int) -> tuple[TokenTree, list[dict[int, int]], list[int]]:
        """Merge continuations into a trie (plain lists, one TokenTree at the end: this runs every step); also
        returns its children maps and match lengths (for `_Pending`).

        A node's score: the match-length-weighted share of continuations through it (relative to its parent)
        times the observed rate of its parent's match length, multiplied down the path."""
        tokens, parents, depth, weight, longest = [root], [-1], [0], [0.0], [0]
        kids: list[dict[int, int]] = [{}]
        total = 0.0
        for cont, n in conts:
            node, w = 0, float(n * n)  # a longer match predicts better
            total += w
            for t in cont:
                child = kids[node].get(t)
                if child is None:
                    if len(tokens) - 1 >= max_nodes:
                        break
                    child = len(tokens)
                    kids[node][t] = child
                    kids.append({})
                    tokens.append(t)
                    parents.append(node)
                    depth.append(depth[node] + 1)
                    weight.append(0.0)
                    longest.append(0)
                weight[child] += w
                longest[child] = max(longest[child], n)
                node = child
        match = [min(max((longest[c] for c in children.values()), default=0) + depth[node], _MAX_MATCH)
                 for node, children in enumerate(kids)]
        scores = [1.0] * len(tokens)
        proposals: list[list[Proposal]] = [[] for _ in tokens]
        for parent, children in enumerate(kids):
            for order, c in enumerate(children.values()):
                share = weight[c] / (weight[parent] if parent > 0 else total)
                scores[c] = scores[parent] * share * self.match_rate[match[parent]]
                proposals[c].append(Proposal(self.drafter_id, DraftKind.DETERMINISTIC, None, order=order))
        tree = TokenTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depth), proposals,
                         torch.tensor(scores))
        return tree, kids, match

    def _remember(self, tokens: list[int]) -> None:
        """Add a finished request's text to database (2), forgetting the oldest beyond the bound."""
        if len(self.generated.tokens) + len(tokens) > _MAX_GLOBAL_TOKENS:
            keep = self.generated.tokens[len(self.generated.tokens) // 2:]
            self.generated = NgramIndex(self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)
            self.generated.extend(keep)
        self.generated.extend(tokens)


def _load_corpus(path: Path, tokenizer, cfg: DrafterConfig) -> NgramIndex:
    if tokenizer is None:
        raise ConfigError("corpus: a tokenizer is needed to index a corpus file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"corpus: cannot read {path}: {e}") from None
    idx = NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
    idx.extend(tokenizer.encode(text, add_special_tokens=False))
    return idx
