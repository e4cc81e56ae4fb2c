"""How a model drafter grows one request's tree, level by level: static expansion or best-first growth, children
drawn from q (i.i.d., without replacement), its top-k, or coupled Gumbel-max draws (see `Coupling`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec.noise import PositionNoise, gumbel
from treespec.tree.build import draw_children, prune_tree
from treespec.tree.token_tree import DraftKind, Proposal, TokenTree


@dataclass
class SubsetQ:
    """One-hot drafting's q rows over a truncated draft vocabulary: probs [n, N] of target ids `ids` [N] (zero
    elsewhere). Children are the top-k, so the 262k-wide rows of the full form are never built."""
    probs: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return self.probs.shape[0]

    def __iter__(self):
        return (SubsetQ(row, self.ids) for row in self.probs)


@dataclass
class Coupling:
    """Coupled drafting of a temperature-only request: children are the draft's Gumbel-max draws under the noise
    the target itself draws that position with (`noise.gumbel_uniforms(d)` below a node of depth d), so a draft close
    to the target proposes the target's own next token; `rate` estimates how often that first child is accepted
    (node scores for tree sizing: q says little about it)."""
    noise: PositionNoise
    rate: float


class Growth:
    """One request's tree, grown level by level: `frontier` are the nodes whose q the next forward computes.

    The trees are those of treespec.tree.build's expand_static / grow_best_first (the tests compare them), which
    call a per-tree step function; stepping them here instead lets one draft forward serve every request.
    """

    def __init__(self, root: int, kind: DraftKind, generator: torch.Generator | None, drafter: int,
                 budget: int, coupling: Coupling | None = None) -> None:
        self.tree = TokenTree.root(root)
        self.kind, self.generator, self.drafter, self.budget = kind, generator, drafter, budget
        self.coupling = coupling
        self.frontier: list[int] = [0]

    def extend(self, q: torch.Tensor | SubsetQ) -> None:  # q: [len(frontier), V]
        raise NotImplementedError

    def result(self) -> TokenTree:
        """The root and the `budget` best nodes (pruned proposals stay as dropped stages, so sampling stays exact)."""
        return prune_tree(self.tree, self.budget)

    def add_children(self, node: int, q: torch.Tensor | SubsetQ, k: int) -> list[int]:  # q: [V] or a SubsetQ row
        """Draw k children of `node` from q and add them; returns the distinct children in draw order."""
        row = None if self.kind is DraftKind.DETERMINISTIC else q
        c = self.coupling
        if isinstance(q, SubsetQ) or c is not None:  # one-hot drafts: the top-k (of the coupled keys)
            probs, ids = (q.probs, q.ids) if isinstance(q, SubsetQ) else (q, None)
            keys = probs if c is None else self._coupled_keys(node, probs, ids)
            top = torch.topk(keys, min(k, int((probs > 0).sum())))
            toks = top.indices if ids is None else ids[top.indices]
            ps = probs[top.indices].tolist()
            if c is not None:  # the first draw is the target's about `rate` of the time; the others share the rest
                ps = [c.rate] + [(1.0 - c.rate) * p for p in ps[1:]]
            draws = list(zip(toks.tolist(), ps))
        else:
            draws = [(tok, float(q[tok])) for tok in draw_children(q, k, self.kind, self.generator)]
        children: list[int] = []
        for tok, p in draws:
            child = self.tree.add_child(node, tok, Proposal(self.drafter, self.kind, row),
                                        score=float(self.tree.scores[node]) * p)
            if child not in children:
                children.append(child)
        return children

    def _coupled_keys(self, node: int, probs: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """log q + g with g the Gumbel noise the target itself will draw this position with: the draft's own
        Gumbel-max draw under the target's noise, which is the target's draw whenever q is close to p."""
        u = self.coupling.noise.gumbel_uniforms(int(self.tree.depth[node]))
        return probs.double().log() + gumbel(u if ids is None else u[ids])


class StaticGrowth(Growth):
    """SpecInfer's expansion tree: every node at depth i-1 gets expansion[i-1] children."""

    def __init__(self, root: int, kind: DraftKind, generator: torch.Generator | None, drafter: int,
                 budget: int, coupling: Coupling | None, expansion: list[int]) -> None:
        super().__init__(root, kind, generator, drafter, budget, coupling)
        self.levels = list(expansion)
        if not self.levels:
            self.frontier = []

    def extend(self, q: torch.Tensor) -> None:
        k = self.levels.pop(0)
        nodes = [c for row, u in zip(q, self.frontier) for c in self.add_children(u, row, k)]
        self.frontier = nodes if self.levels else []


class BestFirstGrowth(Growth):
    """EAGLE-2 / SpecExec: at each depth the `branch` best new nodes (cumulative draft probability) get
    `branch` children each; growth stops at max_depth or once `budget` nodes outscore the whole frontier."""

    def __init__(self, root: int, kind: DraftKind, generator: torch.Generator | None, drafter: int,
                 budget: int, coupling: Coupling | None, max_depth: int, branch: int) -> None:
        super().__init__(root, kind, generator, drafter, budget, coupling)
        self.depth_left, self.branch = max_depth, branch
        if max_depth <= 0:
            self.frontier = []

    def extend(self, q: torch.Tensor) -> None:
        new = [c for row, u in zip(q, self.frontier) for c in self.add_children(u, row, self.branch)]
        self.depth_left -= 1
        scores = self.tree.scores
        best = sorted(new, key=lambda i: (-float(scores[i]), i))[: self.branch]
        if self.depth_left <= 0 or not best or int((scores[1:] >= scores[best[0]]).sum()) >= self.budget:
            best = []
        self.frontier = best
