"""TokenTree structure, merging, static expansion and best-first growth."""
import math
from collections import Counter

import pytest
import torch

from treespec.tree import (SPECINFER_EXPANSION, DraftKind, Proposal, TokenTree, draw_children, expand_static,
                           grow_best_first, merge_trees)

DET = Proposal(0, DraftKind.DETERMINISTIC, None)


def random_tree(n: int, vocab: int, seed: int) -> TokenTree:
    g = torch.Generator().manual_seed(seed)
    tree = TokenTree.root(0)
    while tree.n < n:
        parent = int(torch.randint(tree.n, (), generator=g))
        tree.add_child(parent, int(torch.randint(vocab, (), generator=g)), DET)
    return tree


def naive_ancestor_mask(tree: TokenTree) -> torch.Tensor:
    parents = tree.parents.tolist()
    mask = torch.zeros(tree.n, tree.n, dtype=torch.bool)
    for i in range(tree.n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def table_step(vocab: int, seed: int, sharp: float = 2.0):
    """A drafter whose q at a node depends on the node's token path (rows drawn once, then reused)."""
    g = torch.Generator().manual_seed(seed)
    rows: dict[tuple, torch.Tensor] = {}

    def step(tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        out = []
        for u in nodes:
            key = tuple(tree.tokens[tree.path_to(u)].tolist())
            if key not in rows:
                rows[key] = torch.softmax(sharp * torch.randn(vocab, generator=g, dtype=torch.float64), 0)
            out.append(rows[key])
        return torch.stack(out)
    return step


# ---- structure ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_ancestor_mask_matches_naive(seed):
    tree = random_tree(40, 3, seed)
    tree.validate()
    assert torch.equal(tree.ancestor_mask(), naive_ancestor_mask(tree))


def test_root_only_tree():
    tree = TokenTree.root(7)
    tree.validate()
    assert tree.n == 1 and tree.tokens.tolist() == [7] and tree.ancestor_mask().tolist() == [[True]]
    assert tree.children(0) == [] and tree.stages(0) == [] and tree.path_to(0) == [0]


def test_paths_children_and_find_child():
    tree = TokenTree.root(0)
    a = tree.add_child(0, 5, DET)
    b = tree.add_child(a, 6, DET)
    c = tree.add_child(0, 7, DET)
    assert tree.children(0) == [a, c] and tree.children(a) == [b]
    assert tree.path_to(b) == [0, a, b] and tree.depth.tolist() == [0, 1, 2, 1]
    assert tree.find_child(0, 7) == c and tree.find_child(a, 7) is None


def test_add_child_reuses_child_and_records_draw_order():
    q = torch.tensor([0.5, 0.3, 0.2])
    tree = TokenTree.root(0)
    for tok in (1, 2, 1):
        tree.add_child(0, tok, Proposal(3, DraftKind.IID, q))
    assert tree.n == 3 and [len(p) for p in tree.proposals] == [0, 2, 1]
    assert [(s.token, s.child, s.proposal.order) for s in tree.stages(0)] == [(1, 1, 0), (2, 2, 1), (1, 1, 2)]
    assert tree.scores.tolist() == pytest.approx([1.0, 0.3, 0.2])


def test_select_moves_pruned_proposals_to_dropped():
    q = torch.tensor([0.1, 0.6, 0.3])
    tree = TokenTree.root(0)
    a = tree.add_child(0, 1, Proposal(0, DraftKind.IID, q))
    b = tree.add_child(0, 2, Proposal(0, DraftKind.IID, q))
    tree.add_child(b, 1, Proposal(0, DraftKind.IID, q))
    tree.add_child(0, 1, Proposal(0, DraftKind.IID, q))
    sub = tree.select([0, a])
    sub.validate()
    assert sub.n == 2 and sub.tokens.tolist() == [0, 1] and len(sub.proposals[1]) == 2
    assert [(s.token, s.child, s.proposal.order) for s in sub.stages(0)] == [(1, 1, 0), (2, None, 1), (1, 1, 2)]
    with pytest.raises(ValueError, match="parent"):
        tree.select([0, 3])
    with pytest.raises(ValueError, match="root"):
        tree.select([1, 0])


def _malformed():
    q = torch.tensor([0.5, 0.5])
    good = dict(tokens=torch.tensor([0, 1, 1]), parents=torch.tensor([-1, 0, 1]), depth=torch.tensor([0, 1, 2]),
                proposals=[[], [DET], [DET]])
    yield "parents", {**good, "parents": torch.tensor([-1, 2, 0])}
    yield "parents", {**good, "parents": torch.tensor([0, 0, 1])}
    yield "depth", {**good, "depth": torch.tensor([0, 1, 1])}
    yield "same token", {**good, "parents": torch.tensor([-1, 0, 0]), "depth": torch.tensor([0, 1, 1])}
    yield "has none", {**good, "proposals": [[], [DET], []]}
    yield "None only", {**good, "proposals": [[], [DET], [Proposal(0, DraftKind.IID, None)]]}
    yield "full-vocabulary", {**good, "proposals": [[], [DET], [Proposal(0, DraftKind.IID, q[None])]]}
    yield "tokens", {**good, "tokens": torch.tensor([0.0, 1.0, 1.0])}
    yield "root", {**good, "proposals": [[DET], [DET], [DET]]}


@pytest.mark.parametrize("match,fields", list(_malformed()))
def test_validate_rejects_malformed_trees(match, fields):
    with pytest.raises(ValueError, match=match):
        TokenTree(**fields).validate()


# ---- merging ------------------------------------------------------------------------------------------------
def test_merge_is_a_trie_union_keeping_every_proposal_in_drafter_order():
    qa, qb = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.6, 0.2, 0.2])
    ta, tb = TokenTree.root(9), TokenTree.root(9)
    x = ta.add_child(0, 1, Proposal(0, DraftKind.IID, qa))
    ta.add_child(0, 2, Proposal(0, DraftKind.IID, qa))
    ta.add_child(x, 0, Proposal(0, DraftKind.IID, qa))
    ta.add_child(0, 1, Proposal(0, DraftKind.IID, qa))
    y = tb.add_child(0, 1, Proposal(1, DraftKind.WITHOUT_REPLACEMENT, qb))
    tb.add_child(y, 0, Proposal(1, DraftKind.WITHOUT_REPLACEMENT, qb))
    tb.add_child(0, 0, Proposal(1, DraftKind.WITHOUT_REPLACEMENT, qb))
    merged = merge_trees([ta, tb])
    merged.validate()
    paths = {tuple(merged.tokens[merged.path_to(i)].tolist()) for i in range(merged.n)}
    assert paths == {(9,), (9, 1), (9, 2), (9, 1, 0), (9, 0)}
    assert sum(map(len, merged.proposals)) == sum(map(len, ta.proposals)) + sum(map(len, tb.proposals))
    assert [(s.token, s.proposal.drafter) for s in merged.stages(0)] == [(1, 0), (2, 0), (1, 0), (1, 1), (0, 1)]
    under_1 = merged.stages(merged.find_child(0, 1))
    assert [(s.token, s.proposal.drafter) for s in under_1] == [(0, 0), (0, 1)]


def test_merge_keeps_dropped_stages_and_rejects_different_roots():
    q = torch.tensor([0.5, 0.5])
    t = TokenTree.root(0)
    t.add_child(0, 1, Proposal(0, DraftKind.IID, q))
    t.add_child(0, 0, Proposal(0, DraftKind.IID, q))
    pruned = t.select([0, 1])
    merged = merge_trees([pruned, t])
    assert [(s.token, s.child is None) for s in merged.stages(0)] == [(1, False), (0, True), (1, False), (0, False)]
    with pytest.raises(ValueError, match="roots"):
        merge_trees([TokenTree.root(0), TokenTree.root(1)])


# ---- static expansion ---------------------------------------------------------------------------------------
def test_expand_static_specinfer_default_shape():
    calls = []
    step = table_step(10, seed=0)

    def counting(tree, nodes):
        calls.append(len(nodes))
        return step(tree, nodes)
    tree = expand_static(counting, root=4, expansion=SPECINFER_EXPANSION, kind=DraftKind.DETERMINISTIC)
    tree.validate()
    leaves = [i for i in range(tree.n) if not tree.children(i)]
    assert tree.n == 1 + 1 + 1 + 3 * 6 and len(leaves) == 3 and int(tree.depth.max()) == 8
    assert calls == [1, 1, 1, 3, 3, 3, 3, 3]
    assert all(p.q is None and p.kind is DraftKind.DETERMINISTIC for ps in tree.proposals for p in ps)
    # top-k: the 3 children at depth 3 are the 3 most likely tokens under q there
    branch = int((tree.depth == 2).nonzero()[0])
    q = step(tree, [branch])[0]
    assert sorted(tree.tokens[tree.children(branch)].tolist()) == sorted(torch.topk(q, 3).indices.tolist())


@pytest.mark.parametrize("kind", [DraftKind.IID, DraftKind.WITHOUT_REPLACEMENT])
def test_expand_static_sampled_children(kind):
    g = torch.Generator().manual_seed(1)
    tree = expand_static(table_step(3, seed=2, sharp=3.0), root=0, expansion=[4, 2], kind=kind, generator=g)
    tree.validate()
    at_root = tree.stages(0)
    if kind is DraftKind.IID:
        assert len(at_root) == 4  # duplicates kept as proposals
    else:
        assert len(at_root) == 3 and len({s.token for s in at_root}) == 3  # capped at the support
    assert all(p.q is not None and p.kind is kind for ps in tree.proposals for p in ps)
    for c in tree.children(0):
        assert len(tree.stages(c)) == 2
        assert float(tree.scores[c]) == pytest.approx(float(tree.proposals[c][0].q[int(tree.tokens[c])]))


def test_gumbel_top_k_draws_follow_sequential_sampling_without_replacement():
    q = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 6000
    counts = Counter(tuple(draw_children(q, 2, DraftKind.WITHOUT_REPLACEMENT, g)) for _ in range(n))
    chi2 = 0.0
    for a in range(4):
        for b in range(4):
            if a != b:
                expected = n * float(q[a] * q[b] / (1 - q[a]))
                chi2 += (counts[(a, b)] - expected) ** 2 / expected
    assert chi2 < 45.0  # 11 degrees of freedom: P(chi2 > 45) ~ 5e-6


def test_draw_children_iid_and_top_k():
    q = torch.tensor([0.1, 0.0, 0.6, 0.3])
    assert draw_children(q, 2, DraftKind.DETERMINISTIC, None) == [2, 3]
    assert draw_children(q, 9, DraftKind.DETERMINISTIC, None) == [2, 3, 0]
    iid = draw_children(q, 50, DraftKind.IID, torch.Generator().manual_seed(0))
    assert len(iid) == 50 and 1 not in iid


# ---- best-first growth --------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,max_depth,branch", [(1, 4, 2), (5, 4, 2), (12, 6, 3), (40, 3, 4)])
def test_best_first_keeps_the_budget_best_connected_nodes(budget, max_depth, branch):
    step = table_step(8, seed=budget)
    tree = grow_best_first(step, 3, budget, max_depth, branch)
    tree.validate()
    full = grow_best_first(step, 3, 10_000, max_depth, branch)  # slow twin: grow everything, prune afterwards
    best = sorted(range(1, full.n), key=lambda i: (-float(full.scores[i]), i))[:budget]
    expect = full.select([0] + sorted(best))
    assert tree.n - 1 == min(budget, full.n - 1) <= budget
    assert int(tree.depth.max()) <= max_depth
    assert torch.equal(tree.tokens, expect.tokens) and torch.equal(tree.parents, expect.parents)
    assert torch.allclose(tree.scores, expect.scores)
    assert bool((tree.scores[1:] <= tree.scores[tree.parents[1:]]).all())  # parents outscore children
    for i in range(1, tree.n):  # a node's score is its cumulative draft probability
        path = tree.path_to(i)
        prob = math.prod(float(step(tree, [a])[0][int(tree.tokens[b])]) for a, b in zip(path, path[1:]))
        assert float(tree.scores[i]) == pytest.approx(prob)


def test_best_first_stops_drafting_when_no_frontier_node_can_enter_the_budget():
    step = table_step(8, seed=3, sharp=0.1)  # flat q: children score far below their parents
    calls = []

    def counting(tree, nodes):
        calls.append(len(nodes))
        return step(tree, nodes)
    tree = grow_best_first(counting, 0, budget=4, max_depth=6, branch=4)
    # the grandchildren (drafted by the 2nd call) all score below the 4 root children: no 3rd..6th call
    assert tree.n == 5 and calls == [1, 4] and tree.children(0) == [1, 2, 3, 4]
