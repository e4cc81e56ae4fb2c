"""Building token trees: merge several drafters' trees, static expansion, best-first growth under a budget.

`step(tree, node_ids) -> [len(node_ids), V]` is the drafter: its processed distribution q at those nodes
(processed exactly like the target's p, see treespec.sampling.logits_to_probs).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from treespec.noise import gumbel
from treespec.tree.token_tree import DraftKind, Proposal, TokenTree

StepFn = Callable[[TokenTree, list[int]], torch.Tensor]

SPECINFER_EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)  # SpecInfer's default <k1..km>: one 3-way branch at depth 3


def draw_children(q: torch.Tensor, k: int, kind: DraftKind, generator: torch.Generator | None) -> list[int]:
    """k child tokens from q: [V], in draw order (fewer than k if q's support is smaller and draws are distinct).

    IID draws with replacement; WITHOUT_REPLACEMENT uses Gumbel-top-k (its ranking is sequential sampling
    without replacement); DETERMINISTIC takes the top-k.
    """
    support = int((q > 0).sum())
    if kind is DraftKind.IID:
        return torch.multinomial(q, k, replacement=True, generator=generator).tolist()
    k = min(k, support)
    if kind is DraftKind.DETERMINISTIC:
        return torch.topk(q, k).indices.tolist()
    u = torch.rand(q.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    keys = q.double().log() + gumbel(u)
    return torch.topk(keys, k).indices.tolist()


def _expand(tree: TokenTree, node: int, q: torch.Tensor, k: int, kind: DraftKind,
            generator: torch.Generator | None, drafter: int) -> list[int]:
    """Draw k children of `node` from q: [V] and add them; returns the distinct child indices in draw order."""
    row = None if kind is DraftKind.DETERMINISTIC else q
    children: list[int] = []
    for tok in draw_children(q, k, kind, generator):
        child = tree.add_child(node, tok, Proposal(drafter, kind, row), score=float(tree.scores[node] * q[tok]))
        if child not in children:
            children.append(child)
    return children


def expand_static(step: StepFn, root: int, expansion: Sequence[int] = SPECINFER_EXPANSION,
                  kind: DraftKind = DraftKind.DETERMINISTIC, generator: torch.Generator | None = None,
                  drafter: int = 0) -> TokenTree:
    """SpecInfer's expansion-based tree: every node at depth i-1 gets expansion[i-1] children."""
    tree = TokenTree.root(root)
    frontier = [0]
    for k in expansion:
        if not frontier:
            break
        q = step(tree, frontier)  # [len(frontier), V]
        frontier = [c for row, u in zip(q, frontier) for c in _expand(tree, u, row, k, kind, generator, drafter)]
    return tree


def grow_best_first(step: StepFn, root: int, budget: int, max_depth: int, branch: int,
                    kind: DraftKind = DraftKind.DETERMINISTIC, generator: torch.Generator | None = None,
                    drafter: int = 0) -> TokenTree:
    """EAGLE-2 / SpecExec dynamic tree: at each depth expand the `branch` best new nodes by cumulative draft
    probability into `branch` children each, then keep the root and the `budget` best nodes.

    A child never outscores its parent and ties go to the lower index, so the kept set is parent-closed.
    Growth stops early once `budget` nodes already outscore every frontier node.
    """
    tree = TokenTree.root(root)
    frontier = [0]
    for _ in range(max_depth):
        frontier = sorted(frontier, key=lambda i: (-float(tree.scores[i]), i))[:branch]
        if not frontier or int((tree.scores[1:] >= tree.scores[frontier[0]]).sum()) >= budget:
            break
        q = step(tree, frontier)  # [len(frontier), V]
        frontier = [c for row, u in zip(q, frontier) for c in _expand(tree, u, row, branch, kind, generator, drafter)]
    best = sorted(range(1, tree.n), key=lambda i: (-float(tree.scores[i]), i))[:budget]
    return tree.select([0] + sorted(best))


def merge_trees(trees: list[TokenTree]) -> TokenTree:
    """Prefix-trie union of trees with the same root, keeping every proposal (duplicates included).

    Proposals at each node are ordered by tree (drafter) first, then by their order within that tree, so the
    order is fixed before any token is seen. A merged node's score is the best of its scores.
    """
    if not trees:
        raise ValueError("merge_trees: no trees")
    root = int(trees[0].tokens[0])
    if any(int(t.tokens[0]) != root for t in trees):
        raise ValueError("merge_trees: the trees have different roots")
    out = TokenTree.root(root)
    for t in trees:
        where = {0: 0}
        for u in range(t.n):  # topological order: where[u] is known when u's children are added
            for s in t.stages(u):
                if s.child is None:
                    out.add_dropped(where[u], s.token, s.proposal)
                else:
                    where[s.child] = out.add_child(where[u], s.token, s.proposal, score=float(t.scores[s.child]))
    return out


def prune_tree(tree: TokenTree, keep: int) -> TokenTree:
    """Keep the root and the `keep` best-scored draft nodes (a parent-closed set), re-indexed."""
    if keep >= tree.n - 1:
        return tree
    order = sorted(range(1, tree.n), key=lambda i: (-float(tree.scores[i]), i))[:keep]
    return tree.select([0] + sorted(order))
