"""Stochastic verification: multi-draft speculative sampling over a token tree (SpecInfer MSS, Sequoia SWOR).

At node u, with cur = p(.|u), test the stages of u (every proposal at u, in the order drawn; see
TokenTree.stages), each with its own uniform:
- IID proposal x ~ q: accept with probability min(1, cur(x) / q(x)); on reject cur = norm(max(cur - q, 0)).
- WITHOUT_REPLACEMENT: the same, with the drafter's q replaced after each of its rejections by
  norm(q with x zeroed) for its following proposals at u (draws without replacement come from that q).
- DETERMINISTIC (or q is None): q is one-hot on x: accept with probability cur(x); on reject zero cur(x) and
  renormalize.
A repeated token is rejected for sure (cur(x) is already 0), but its residual update is still applied.
An accepted stage moves to its child (or, for a pruned child, emits its token as the bonus and stops).
If every stage is rejected, or u is a leaf, the bonus token is drawn from cur with a fresh uniform.

Nodes whose stages are all DETERMINISTIC (n-gram drafts, top-k children, leaves, plain decoding) may instead
use the equivalent "naive sampling" form: draw y ~ p(.|u) by inverse CDF and descend into the child with
token y if there is one, else emit y. With `noise` (treespec.noise) the uniform for the token at output
position k is fixed in advance, so a seeded request emits exactly what plain seeded sampling would, whatever the tree.
Each stage is one-draft speculative sampling of cur, so by induction the emitted tokens follow p exactly,
provided every proposal was drawn from its q independently of the earlier ones and the order was fixed
before drawing. A residual with zero mass (rounding when cur == q) falls back to p(.|u).
"""
from __future__ import annotations

import torch

from treespec.noise import PositionNoise
from treespec.tree.token_tree import DraftKind, Stage, TokenTree
from treespec.verify.result import VerifyResult


class NodeRule:
    """The acceptance state at one node: the current target residual and each drafter's updated SWOR q."""

    def __init__(self, p: torch.Tensor) -> None:  # p: [V]
        self.p = p
        self.cur = p
        self.swor_q: dict[int, torch.Tensor] = {}

    def draft_q(self, stage: Stage) -> torch.Tensor | None:
        """The q this stage's token was drawn from; None means one-hot on the token."""
        prop = stage.proposal
        if prop.one_hot:
            return None
        if prop.kind is DraftKind.WITHOUT_REPLACEMENT:
            return self.swor_q.setdefault(prop.drafter, prop.q)
        return prop.q

    def accept_prob(self, stage: Stage) -> float:
        """min(1, cur(x) / q(x))."""
        q, x = self.draft_q(stage), stage.token
        cur_x = float(self.cur[x])
        q_x = 1.0 if q is None else float(q[x])
        if q_x <= 0.0:
            return 1.0 if cur_x > 0.0 else 0.0
        return min(1.0, cur_x / q_x)

    def reject(self, stage: Stage) -> None:
        q, x = self.draft_q(stage), stage.token
        if q is None:
            residual = self.cur.clone()
            residual[x] = 0.0
        else:
            residual = (self.cur - q).clamp_min(0.0)
        self.cur = _normalize(residual, fallback=self.p)
        if stage.proposal.kind is DraftKind.WITHOUT_REPLACEMENT and q is not None:
            rest = q.clone()
            rest[x] = 0.0
            self.swor_q[stage.proposal.drafter] = _normalize(rest, fallback=rest)


def verify_stochastic(tree: TokenTree, p: torch.Tensor, generator: torch.Generator | None = None,
                      noise: PositionNoise | None = None) -> VerifyResult:
    """p: [n, V] processed target probabilities at every node. Emits exactly the target's distribution.

    noise.uniform(d): the uniform for the token emitted after a node at depth d (see module doc).
    """
    path = [0]
    while True:
        u = path[-1]
        stages = tree.stages(u)
        if noise is not None and all(s.proposal.one_hot for s in stages):
            y = sample_inverse_cdf(p[u], noise.uniform(int(tree.depth[u])))
            child = next((s.child for s in stages if s.token == y), None)
            if child is None:
                return VerifyResult(path, y)
            path.append(child)
            continue
        rule = NodeRule(p[u])
        for stage in stages:
            if _uniform(generator) < rule.accept_prob(stage):
                if stage.child is None:
                    return VerifyResult(path, stage.token)
                path.append(stage.child)
                break
            rule.reject(stage)
        else:
            return VerifyResult(path, sample_inverse_cdf(rule.cur, _uniform(generator)))


def sample_inverse_cdf(probs: torch.Tensor, u: float) -> int:
    """The token whose cumulative-probability interval contains u * total; probs: [V], u in [0, 1)."""
    cdf = probs.double().cumsum(0)
    i = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True))
    return min(i, int(probs.nonzero().max()))  # rounding at u -> 1 must not land on a zero-mass tail


def _normalize(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = float(x.sum())
    return x / total if total > 0.0 else fallback


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))
