"""The token tree: candidate continuations of one request, verified by the target in a single forward.

Node 0 is the root: the last emitted token, not yet in the KV cache. Nodes are in topological order
(parents[i] < i). Row i of the target's output over the tree is p(. | prefix, path to i).

For stochastic verification each node keeps its *proposals*: one per time a drafter proposed that token at
that parent, with the full-vocabulary draft row q it was drawn from. Proposals are never collapsed: a token
drawn twice is two proposals (collapsing them biases sampling). Each proposal's `order` is its position
among all proposals made at its parent, assigned by `add_child` in the order they were drawn; verification
tests them in that order. Grouping them by child instead (all proposals of child 1, then child 2, ...)
makes the order depend on the drawn values and is biased (tests/test_verify.py shows it).

When a node is pruned away (`select`), its proposals stay with its parent as *dropped* stages: verification
still tests them, and accepting one emits its token as the bonus. Pruning by score therefore stays exact even
when children were sampled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch


class DraftKind(Enum):
    """How a proposal was drawn from q; decides the acceptance rule (see treespec.verify)."""
    IID = "iid"                                   # sampled from q, independently of the other proposals
    WITHOUT_REPLACEMENT = "without_replacement"   # sampled from q without replacement (Gumbel-top-k)
    DETERMINISTIC = "deterministic"               # chosen (top-k, beam, n-gram): q is treated as one-hot


@dataclass
class Proposal:
    """One drafter's proposal of a child token at its parent."""
    drafter: int
    kind: DraftKind
    q: torch.Tensor | None      # [V] processed draft distribution at the parent; None only for DETERMINISTIC
    order: int = 0              # position among all proposals at the parent; set by TokenTree.add_child

    @property
    def one_hot(self) -> bool:
        """Whether q is one-hot on the token (chosen, not sampled): acceptance then needs only p, not q."""
        return self.kind is DraftKind.DETERMINISTIC or self.q is None


class Stage(NamedTuple):
    """One acceptance test at a node: a proposal, its token and the child it leads to (None if pruned)."""
    token: int
    child: int | None
    proposal: Proposal


@dataclass
class TokenTree:
    tokens: torch.Tensor                # [n] long
    parents: torch.Tensor               # [n] long; parents[0] == -1, parents[i] < i
    depth: torch.Tensor                 # [n] long; depth[0] == 0
    proposals: list[list[Proposal]]     # per node; proposals[0] == []
    scores: torch.Tensor | None = None  # [n] float: cumulative draft probability (root 1.0); cost model's input
    # per node: (token, proposal) of children pruned away by select(); still tested by verification
    dropped: list[list[tuple[int, Proposal]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scores is None:
            self.scores = torch.ones(len(self.tokens), dtype=torch.float32)
        if not self.dropped:
            self.dropped = [[] for _ in range(len(self.tokens))]

    @classmethod
    def root(cls, token: int) -> "TokenTree":
        """A tree with only the root: plain decoding."""
        one = torch.zeros(1, dtype=torch.long)
        return cls(torch.tensor([token], dtype=torch.long), one - 1, one.clone(), [[]])

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    # ---- structure ----------------------------------------------------------------------------------------
    def children(self, i: int) -> list[int]:
        return [c for c, par in enumerate(self.parents.tolist()) if par == i]  # lists: trees are small

    def find_child(self, i: int, token: int) -> int | None:
        for c, (par, tok) in enumerate(zip(self.parents.tolist(), self.tokens.tolist())):
            if par == i and tok == token:
                return c
        return None

    def path_to(self, i: int) -> list[int]:
        """Node indices from the root to i, both included."""
        path = [i]
        while path[-1] != 0:
            path.append(int(self.parents[path[-1]]))
        return path[::-1]

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: mask[i, j] is True iff j is i or an ancestor of i (one tensor op per depth level)."""
        n = self.n
        mask = torch.eye(n, dtype=torch.bool)
        for d in range(1, int(self.depth.max()) + 1):
            rows = (self.depth == d).nonzero().flatten()
            mask[rows] |= mask[self.parents[rows]]
        return mask

    def stages(self, i: int) -> list[Stage]:
        """Every proposal made at node i (kept children and pruned ones), in the order they were drawn."""
        tokens = self.tokens.tolist()
        out = [Stage(tokens[c], c, p) for c in self.children(i) for p in self.proposals[c]]
        out += [Stage(tok, None, p) for tok, p in self.dropped[i]]
        return sorted(out, key=lambda s: s.proposal.order)

    def all_one_hot(self) -> bool:
        """Whether every proposal (kept or dropped) is one-hot, so that verification only needs the target's
        own draw at each visited node (verify/greedy.py's walk) instead of its full distributions."""
        props = [p for ps in self.proposals for p in ps] + [p for ds in self.dropped for _, p in ds]
        return all(p.one_hot for p in props)

    # ---- building -----------------------------------------------------------------------------------------
    def add_child(self, parent: int, token: int, proposal: Proposal, score: float | None = None) -> int:
        """Add `proposal` of `token` under `parent`; reuses an existing child with that token. Returns its index.

        The child's score defaults to score[parent] * q[token] (the parent's score for a one-hot q); a reused
        child keeps the larger score.
        """
        if not 0 <= parent < self.n:
            raise ValueError(f"add_child: parent {parent} is not a node of a tree of {self.n}")
        if score is None:
            score = float(self.scores[parent]) * (float(proposal.q[token]) if proposal.q is not None else 1.0)
        proposal = dataclasses.replace(proposal, order=self._next_order(parent))
        child = self.find_child(parent, token)
        if child is not None:
            self.proposals[child].append(proposal)
            self.scores[child] = max(float(self.scores[child]), score)
            return child
        self.tokens = torch.cat([self.tokens, torch.tensor([token], dtype=torch.long)])
        self.parents = torch.cat([self.parents, torch.tensor([parent], dtype=torch.long)])
        self.depth = torch.cat([self.depth, self.depth[parent:parent + 1] + 1])
        self.scores = torch.cat([self.scores, torch.tensor([score], dtype=self.scores.dtype)])
        self.proposals.append([proposal])
        self.dropped.append([])
        return self.n - 1

    def add_dropped(self, parent: int, token: int, proposal: Proposal) -> None:
        """Record a proposal at `parent` whose child is not in the tree (it is still tested; see module doc)."""
        self.dropped[parent].append((token, dataclasses.replace(proposal, order=self._next_order(parent))))

    def _next_order(self, parent: int) -> int:
        return 1 + max((s.proposal.order for s in self.stages(parent)), default=-1)

    def select(self, keep: list[int]) -> "TokenTree":
        """The subtree on the nodes `keep` (must contain 0 and every kept node's parent), re-indexed in that order.

        Proposals of removed children of kept nodes move to the parent's dropped stages.
        """
        keep = list(keep)
        new_index = {old: new for new, old in enumerate(keep)}
        if not keep or keep[0] != 0 or len(new_index) != len(keep):
            raise ValueError("select: keep must start with the root 0 and list each node once")
        parents = []
        for old in keep[1:]:
            par = int(self.parents[old])
            if new_index.get(par, len(keep)) >= new_index[old]:
                raise ValueError(f"select: node {old}'s parent {par} must be kept before it")
            parents.append(new_index[par])
        dropped = [list(self.dropped[old]) for old in keep]
        for c in range(1, self.n):
            par = int(self.parents[c])
            if c not in new_index and par in new_index:
                dropped[new_index[par]] += [(int(self.tokens[c]), p) for p in self.proposals[c]]
        idx = torch.tensor(keep, dtype=torch.long)
        return TokenTree(self.tokens[idx], torch.tensor([-1] + parents, dtype=torch.long), self.depth[idx],
                         [list(self.proposals[old]) for old in keep], self.scores[idx].clone(), dropped)

    # ---- checks -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError if the tree is malformed."""
        n = self.n
        for name in ("tokens", "parents", "depth"):
            t = getattr(self, name)
            if t.dtype != torch.long or t.shape != (n,):
                raise ValueError(f"{name}: expected a [{n}] long tensor, got {tuple(t.shape)} {t.dtype}")
        if n == 0:
            raise ValueError("tokens: a tree needs at least the root")
        if self.scores.shape != (n,) or len(self.proposals) != n or len(self.dropped) != n:
            raise ValueError("scores, proposals and dropped must have one entry per node")
        if int(self.parents[0]) != -1 or int(self.depth[0]) != 0 or self.proposals[0]:
            raise ValueError("root: parents[0] must be -1, depth[0] 0 and proposals[0] empty")
        idx = torch.arange(n)
        par = self.parents[1:]
        if bool(((par < 0) | (par >= idx[1:])).any()):
            raise ValueError("parents: each node's parent must come before it (parents[i] < i)")
        if bool((self.depth[1:] != self.depth[par] + 1).any()):
            raise ValueError("depth: depth[i] must equal depth[parents[i]] + 1")
        pairs = set(zip(self.parents.tolist(), self.tokens.tolist()))
        if len(pairs) != n:
            raise ValueError("tokens: two children of one parent carry the same token")
        for i in range(n):
            props = self.proposals[i] + [p for _, p in self.dropped[i]]
            if i > 0 and not self.proposals[i]:
                raise ValueError(f"proposals: node {i} has none (every draft node needs a proposal)")
            for p in props:
                if p.q is None and p.kind is not DraftKind.DETERMINISTIC:
                    raise ValueError(f"proposals: node {i}: q may be None only for DETERMINISTIC proposals")
                if p.q is not None and p.q.dim() != 1:
                    raise ValueError(f"proposals: node {i}: q must be a full-vocabulary [V] row")
        for i in range(n):
            orders = [s.proposal.order for s in self.stages(i)]
            if len(set(orders)) != len(orders):
                raise ValueError(f"proposals: two proposals at node {i} share an order")
