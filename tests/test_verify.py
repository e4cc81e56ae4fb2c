"""Verification: greedy against a naive reference; the stochastic rule by exact enumeration.

Exact check: every draft outcome is enumerated by replaying the real tree builders with a scripted
`draw_children` (one branch per possible draw, weighted by its probability), and every coin by walking the
real `NodeRule` (accept probabilities are exact, so each node is a probability-weighted chain of stages).
The joint distribution of the first two emitted tokens must equal p(x1) p(x2 | x1); a step that emits one
token is completed by the next step, which draws from p(. | x1). Known-buggy rules fed to the same checker
must come out biased.
"""
import itertools
import math
from collections import Counter, defaultdict

import pytest
import torch

import treespec.tree.build as build
from treespec.tree import DraftKind, Proposal, TokenTree, expand_static, grow_best_first, merge_trees
from treespec.verify import NodeRule, VerifyResult, verify_greedy, verify_stochastic

IID, SWOR, DET = DraftKind.IID, DraftKind.WITHOUT_REPLACEMENT, DraftKind.DETERMINISTIC
EXACT = 1e-9


class World:
    """Target rows p and per-drafter rows q that depend on the token path after the root (drawn once each)."""

    def __init__(self, vocab: int, seed: int, sharp: float = 1.5) -> None:
        self.vocab, self.sharp = vocab, sharp
        self.g = torch.Generator().manual_seed(seed)
        self.rows: dict[tuple, torch.Tensor] = {}

    def row(self, who, path: tuple) -> torch.Tensor:
        if (who, path) not in self.rows:
            logits = self.sharp * torch.randn(self.vocab, generator=self.g, dtype=torch.float64)
            self.rows[(who, path)] = torch.softmax(logits, 0)
        return self.rows[(who, path)]

    def p(self, path: tuple) -> torch.Tensor:
        return self.row("p", path)

    def step(self, drafter: int):
        return lambda tree, nodes: torch.stack([self.row(drafter, _path(tree, u)) for u in nodes])

    def target_rows(self, tree: TokenTree) -> torch.Tensor:
        return torch.stack([self.p(_path(tree, u)) for u in range(tree.n)])

    def joint(self) -> torch.Tensor:
        """[V, V]: p(x1) p(x2 | x1)."""
        return self.p(())[:, None] * torch.stack([self.p((x,)) for x in range(self.vocab)])


def _path(tree: TokenTree, u: int) -> tuple:
    tokens = tree.tokens.tolist()
    return tuple(tokens[i] for i in tree.path_to(u)[1:])


# ---- enumeration of draft outcomes ------------------------------------------------------------------------
def draw_outcomes(real_draw, q: torch.Tensor, k: int, kind: DraftKind) -> list[tuple[tuple, float]]:
    """Every possible result of draw_children(q, k, kind) with its probability."""
    qs = q.tolist()
    support = [x for x, w in enumerate(qs) if w > 0]
    if kind is DET:
        return [(tuple(real_draw(q, k, kind, None)), 1.0)]
    if kind is IID:
        return [(xs, math.prod(qs[x] for x in xs)) for xs in itertools.product(support, repeat=k)]
    outcomes = []
    for xs in itertools.permutations(support, min(k, len(support))):
        prob, left = 1.0, 1.0
        for x in xs:
            prob, left = prob * qs[x] / left, left - qs[x]
        outcomes.append((xs, prob))
    return outcomes


class _Branch(Exception):
    def __init__(self, n: int) -> None:
        self.n = n


def enumerate_builds(build_fn, monkeypatch) -> list[tuple[TokenTree, float]]:
    """Run build_fn once per combination of draw outcomes; returns (tree, probability) pairs."""
    real = build.draw_children
    out: list[tuple[TokenTree, float]] = []

    def run(prefix: list[int]) -> None:
        state = {"calls": 0, "weight": 1.0}

        def scripted(q, k, kind, generator):
            outcomes = draw_outcomes(real, q, k, kind)
            i = state["calls"]
            state["calls"] += 1
            if i == len(prefix):
                raise _Branch(len(outcomes))
            tokens, prob = outcomes[prefix[i]]
            state["weight"] *= prob
            return list(tokens)
        monkeypatch.setattr(build, "draw_children", scripted)
        try:
            tree = build_fn()
        except _Branch as b:
            for c in range(b.n):
                run(prefix + [c])
            return
        out.append((tree, state["weight"]))
    run([])
    monkeypatch.setattr(build, "draw_children", real)
    assert abs(sum(w for _, w in out) - 1.0) < 1e-9
    return out


# ---- exact output of one verification step ----------------------------------------------------------------
def draw_order(tree: TokenTree, u: int):
    return tree.stages(u)


def emitted(tree: TokenTree, p: torch.Tensor, rule=NodeRule, order=draw_order) -> dict[tuple, float]:
    """Exact distribution of the tokens one step emits (accepted + bonus), mirroring verify_stochastic."""
    out: dict[tuple, float] = defaultdict(float)

    def walk(u: int, prefix: tuple, reach: float) -> None:
        r = rule(p[u])
        for stage in order(tree, u):
            a = r.accept_prob(stage)
            if stage.child is None:
                out[prefix + (stage.token,)] += reach * a
            elif a > 0:
                walk(stage.child, prefix + (stage.token,), reach * a)
            reach *= 1.0 - a
            r.reject(stage)
        for y, py in enumerate(r.cur.tolist()):
            out[prefix + (y,)] += reach * py
    walk(0, (), 1.0)
    return out


def bias(world: World, build_fn, monkeypatch, rule=NodeRule, order=draw_order) -> float:
    """max |P(x1, x2) - p(x1) p(x2 | x1)| over all draft outcomes and coins."""
    joint = torch.zeros(world.vocab, world.vocab, dtype=torch.float64)
    for tree, weight in enumerate_builds(build_fn, monkeypatch):
        tree.validate()
        for seq, prob in emitted(tree, world.target_rows(tree), rule, order).items():
            if len(seq) >= 2:
                joint[seq[0], seq[1]] += weight * prob
            else:
                joint[seq[0]] += weight * prob * world.p(seq[:1])
    return float((joint - world.joint()).abs().max())


# ---- the scenarios ----------------------------------------------------------------------------------------
def static(world, drafter, expansion, kind):
    return lambda: expand_static(world.step(drafter), 0, expansion, kind, drafter=drafter)


def merged(*builders):
    return lambda: merge_trees([b() for b in builders])


SCENARIOS = {  # name: (vocabulary size, world -> build function); sizes keep the enumeration to a few seconds
    "iid, 1 drafter, 3 draws": (5, lambda w: static(w, 0, [3], IID)),
    "iid, 2 drafters (duplicates)": (5, lambda w: merged(static(w, 0, [2], IID), static(w, 1, [2], IID))),
    "swor with q-update": (5, lambda w: static(w, 0, [3], SWOR)),
    "swor, 2 drafters": (5, lambda w: merged(static(w, 0, [2], SWOR), static(w, 1, [2], SWOR))),
    "deterministic top-k": (5, lambda w: static(w, 0, [3], DET)),
    "mixture iid + swor + top-k": (5, lambda w: merged(static(w, 0, [2], IID), static(w, 1, [2], SWOR),
                                                      static(w, 2, [2], DET))),
    "two levels iid": (3, lambda w: static(w, 0, [2, 2], IID)),
    "two levels swor": (3, lambda w: static(w, 0, [2, 2], SWOR)),
    "two levels merged": (3, lambda w: merged(static(w, 0, [1, 1], IID), static(w, 1, [1, 2], SWOR),
                                              static(w, 2, [1, 2], DET))),
    "best-first iid, pruned": (3, lambda w: lambda: grow_best_first(w.step(0), 0, 2, 2, 2, IID)),
    "best-first swor, pruned": (3, lambda w: lambda: grow_best_first(w.step(0), 0, 3, 2, 2, SWOR)),
}


def check(name: str, seed: int, monkeypatch, rule=NodeRule, order=draw_order) -> float:
    vocab, make = SCENARIOS[name]
    world = World(vocab, seed)
    return bias(world, make(world), monkeypatch, rule, order)


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("seed", [0, 1])
def test_stochastic_rule_is_exact(name, seed, monkeypatch):
    assert check(name, seed, monkeypatch) < EXACT


class SkipRepeatRule(NodeRule):
    """Pitfall: a token already rejected at this node is skipped without its residual update."""

    def __init__(self, p):
        super().__init__(p)
        self.seen: set[int] = set()

    def reject(self, stage):
        if stage.token not in self.seen:
            self.seen.add(stage.token)
            super().reject(stage)


class NoSworUpdateRule(NodeRule):
    """Pitfall: draws without replacement tested with SpecInfer's rule, q never updated."""

    def draft_q(self, stage):
        return None if stage.proposal.q is None else stage.proposal.q


def child_order(tree: TokenTree, u: int):
    """Pitfall: proposals grouped by child (child order, then proposal order) instead of draw order."""
    return sorted(tree.stages(u), key=lambda s: (s.child is None, s.child or 0, s.proposal.order))


def kept_children_only(tree: TokenTree, u: int):
    """Pitfall: pruning sampled children by score and forgetting their proposals."""
    return [s for s in tree.stages(u) if s.child is not None]


def top_k_labelled(kind: DraftKind):
    """Top-2 children of q, proposed with q and the given kind: exact as DETERMINISTIC (one-hot q), biased as IID
    (pitfall: deterministic children tested with the real ratio p/q)."""
    def make(world: World):
        def build_fn():
            tree = TokenTree.root(0)
            q = world.step(0)(tree, [0])[0]
            for x in torch.topk(q, 2).indices.tolist():
                tree.add_child(0, x, Proposal(0, kind, q))
            return tree
        return build_fn
    return make


SCENARIOS["top-k children, one-hot q"] = (4, top_k_labelled(DET))
SCENARIOS["top-k children labelled iid"] = (4, top_k_labelled(IID))
PITFALLS = {  # name: (scenario exact under the real rule, scenario that shows the pitfall, rule, order)
    "skip repeats": ("iid, 1 drafter, 3 draws", "iid, 1 drafter, 3 draws", SkipRepeatRule, draw_order),
    "skip repeats across drafters": ("iid, 2 drafters (duplicates)", "iid, 2 drafters (duplicates)",
                                     SkipRepeatRule, draw_order),
    "no swor update": ("swor with q-update", "swor with q-update", NoSworUpdateRule, draw_order),
    "child order": ("iid, 2 drafters (duplicates)", "iid, 2 drafters (duplicates)", NodeRule, child_order),
    "forget pruned": ("best-first iid, pruned", "best-first iid, pruned", NodeRule, kept_children_only),
    "top-k with real q": ("top-k children, one-hot q", "top-k children labelled iid", NodeRule, draw_order),
}


@pytest.mark.parametrize("pitfall", list(PITFALLS))
def test_checker_detects_biased_rules(pitfall, monkeypatch):
    good, bad, rule, order = PITFALLS[pitfall]
    assert check(good, 0, monkeypatch) < EXACT
    # not every random instance exposes a pitfall: try a few
    assert any(check(bad, seed, monkeypatch, rule, order) > 1e-3 for seed in range(8))


def test_zero_mass_residual_falls_back_to_p():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    tree = TokenTree.root(0)
    tree.add_child(0, 0, Proposal(0, DET, None))
    tree.add_child(0, 1, Proposal(1, IID, torch.tensor([0.0, 0.6, 0.4, 0.0], dtype=torch.float64)))
    one_hot, iid = tree.stages(0)
    rule = NodeRule(p)
    rule.reject(one_hot)
    assert torch.allclose(rule.cur, torch.tensor([0.0, 0.6, 0.4, 0.0], dtype=torch.float64))
    assert rule.accept_prob(iid) == pytest.approx(1.0)
    rule.reject(iid)  # only rounding gets here: max(cur - q, 0) has no mass
    assert torch.equal(rule.cur, p)  # p(u), not the previous residual


def test_swor_q_update_renormalizes_per_drafter():
    q = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    p = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    tree = TokenTree.root(0)
    for x, drafter in ((0, 0), (1, 1), (1, 0)):
        tree.add_child(0, x, Proposal(drafter, SWOR, q))
    first, other, second = tree.stages(0)
    rule = NodeRule(p)
    assert rule.accept_prob(first) == pytest.approx(0.1 / 0.5)
    rule.reject(first)
    assert torch.allclose(rule.cur, torch.tensor([0.0, 0.05, 0.35], dtype=torch.float64) / 0.4)
    assert torch.allclose(rule.draft_q(second), torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64))
    assert torch.equal(rule.draft_q(other), q)  # drafter 1's q is untouched


# ---- Monte Carlo: the real verify_stochastic against the exact distribution --------------------------------
F64 = dict(dtype=torch.float64)


def repeats_tree() -> tuple[TokenTree, torch.Tensor]:
    """Root stages: iid 1, iid 2 (pruned: a dropped stage), iid 1 again, one-hot 0; then a second level.
    The rows make every detail count: token 2 is accepted w.p. ~0.63, and the residual update of the
    (surely rejected) repeated 1 removes all of cur's mass from token 0, so skipping it lets 0 through."""
    q = torch.tensor([0.30, 0.40, 0.20, 0.05, 0.05], **F64)
    q_deep = torch.tensor([0.40, 0.10, 0.20, 0.20, 0.10], **F64)
    t = TokenTree.root(0)
    a = t.add_child(0, 1, Proposal(0, IID, q))
    t.add_child(0, 2, Proposal(0, IID, q))
    t.add_child(0, 1, Proposal(0, IID, q))
    c = t.add_child(0, 0, Proposal(2, DET, None))
    t.add_child(a, 3, Proposal(0, IID, q_deep))
    t.add_child(a, 0, Proposal(0, IID, q_deep))
    t.add_child(c, 4, Proposal(2, DET, None))
    t = t.select([i for i in range(t.n) if i != t.find_child(0, 2)])
    p = torch.softmax(0.5 * torch.randn(t.n, 5, generator=torch.Generator().manual_seed(5), **F64), -1)
    p[0] = torch.tensor([0.45, 0.05, 0.25, 0.15, 0.10], **F64)
    return t, p


def swor_tree() -> tuple[TokenTree, torch.Tensor]:
    """Root stages: swor 3, swor 4 (one drafter), iid 0 (another); the q-update lifts the acceptance of 4 from
    ~0.58 to ~0.67 of all runs, and a second level hangs under 3."""
    q = torch.tensor([0.05, 0.05, 0.10, 0.60, 0.20], **F64)
    q_other = torch.tensor([0.40, 0.10, 0.20, 0.20, 0.10], **F64)
    t = TokenTree.root(0)
    b = t.add_child(0, 3, Proposal(1, SWOR, q))
    t.add_child(0, 4, Proposal(1, SWOR, q))
    t.add_child(0, 0, Proposal(0, IID, q_other))
    t.add_child(b, 2, Proposal(2, DET, None))
    p = torch.softmax(0.5 * torch.randn(t.n, 5, generator=torch.Generator().manual_seed(6), **F64), -1)
    p[0] = torch.tensor([0.20, 0.10, 0.15, 0.15, 0.40], **F64)
    return t, p


MC_TREES = {  # name: (tree builder, wrong variants of `emitted` the samples must reject)
    "repeats and a dropped stage": (repeats_tree, [dict(rule=SkipRepeatRule), dict(order=child_order),
                                                   dict(order=kept_children_only)]),
    "without replacement": (swor_tree, [dict(rule=NoSworUpdateRule)]),
}


def chi2_stat(counts: Counter, expected: dict[tuple, float], n: int) -> tuple[float, int]:
    """Pearson chi2 over outcomes with >= 5 expected hits (the rest pooled), and its degrees of freedom."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for seq, prob in expected.items():
        if n * prob >= 5:
            stat += (counts[seq] - n * prob) ** 2 / (n * prob)
            cells += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + counts[seq], pooled_exp + n * prob
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    assert sum(counts[s] for s in expected) == n  # nothing outside the support
    return stat, cells - 1


def chi2_limit(df: int, z: float = 4.75) -> float:
    """Upper quantile of chi2(df) at a normal z-score (Wilson-Hilferty); z = 4.75 is about 1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("name", list(MC_TREES))
def test_verify_stochastic_matches_exact_distribution(name):
    make, wrong_variants = MC_TREES[name]
    tree, p = make()
    tree.validate()
    exact = emitted(tree, p)
    assert sum(exact.values()) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    n = 5000
    counts: Counter = Counter()
    for _ in range(n):
        res = verify_stochastic(tree, p, g)
        assert res.path[0] == 0 and all(int(tree.parents[b]) == a for a, b in zip(res.path, res.path[1:]))
        counts[tuple(tree.tokens[res.path[1:]].tolist()) + (res.bonus_token,)] += 1
    stat, df = chi2_stat(counts, exact, n)
    assert stat < chi2_limit(df)
    for kw in wrong_variants:  # the same samples reject subtly wrong rules: the test has power
        wrong_stat, wrong_df = chi2_stat(counts, emitted(tree, p, **kw), n)
        assert wrong_stat > chi2_limit(wrong_df), kw


def test_draft_equal_to_target_is_always_accepted():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    tree = TokenTree.root(0)
    for depth in range(3):
        tree.add_child(depth, depth + 1, Proposal(0, IID, p[depth]))
    for _ in range(20):
        assert verify_stochastic(tree, p, g).path == [0, 1, 2, 3]
    greedy = verify_greedy(tree, torch.tensor([1, 2, 3, 5]))
    assert greedy == VerifyResult([0, 1, 2, 3], 5) and greedy.num_accepted == 3


# ---- greedy -----------------------------------------------------------------------------------------------
def naive_greedy(tree: TokenTree, argmax: list[int]) -> VerifyResult:
    """The deepest node whose every edge follows the target's argmax at its parent."""
    best = [0]
    for v in range(tree.n):
        path = tree.path_to(v)
        if all(int(tree.tokens[b]) == argmax[a] for a, b in zip(path, path[1:])) and len(path) > len(best):
            best = path
    return VerifyResult(best, argmax[best[-1]])


@pytest.mark.parametrize("seed", range(20))
def test_greedy_matches_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    tree = TokenTree.root(0)
    while tree.n < 30:
        tree.add_child(int(torch.randint(tree.n, (), generator=g)), int(torch.randint(3, (), generator=g)),
                       Proposal(0, DET, None))
    argmax = torch.randint(3, (tree.n,), generator=g)
    assert verify_greedy(tree, argmax) == naive_greedy(tree, argmax.tolist())


def test_greedy_root_only_is_plain_decoding():
    assert verify_greedy(TokenTree.root(4), torch.tensor([9])) == VerifyResult([0], 9)
    assert verify_stochastic(TokenTree.root(4), torch.tensor([[0.0, 1.0]]), None) == VerifyResult([0], 1)
