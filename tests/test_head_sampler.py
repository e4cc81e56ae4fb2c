"""Gumbel-max draws through the fp16 screen: the screened draw equals the brute-force draw over every exact
logit for the same uniforms (the slow twin), on random heads, near-tie heads, with a softcap and at several
temperatures; and the draws follow softmax(x / T) (chi-squared). Routing: which requests take which head path."""
import math

import pytest
import torch
from test_lm_head import D, near_tie_head, needs_fbgemm, planted_states, random_head

from treespec.engine.request import Request
from treespec.engine.runner import HeadPath, head_path
from treespec.models.head_sampler import NodeSampler, exact_logits, gumbel_sample
from treespec.models.lm_head import LMHead
from treespec.noise import PositionNoise, RequestNoise, gumbel
from treespec.sampling import SamplingParams
from treespec.tree.token_tree import DraftKind, Proposal, TokenTree


def brute_force(head: LMHead, h: torch.Tensor, u: torch.Tensor, t: float) -> int:
    return int((exact_logits(head, h) / t + gumbel(u)).argmax())


def uniforms(seed: int, v: int) -> torch.Tensor:
    return torch.rand(v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@needs_fbgemm
@pytest.mark.parametrize("t", [1.0, 0.3, 2.5, 0.02])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_screened_draw_equals_brute_force(t, softcap):
    w = random_head()
    head = LMHead(w, softcap=softcap)
    g = torch.Generator().manual_seed(5)
    for k in range(60):
        scale = [0.3, 3.0, 30.0][k % 3]  # flat, medium and peaked distributions
        h = torch.randn(D, generator=g) * scale
        u = uniforms(k, w.shape[0])
        s = head.screen_logits(h[None])[0]
        assert gumbel_sample(head, h, u, t, s) == brute_force(head, h, u, t)
    assert head.stats.screened == 60 and head.stats.fallbacks == 0


@needs_fbgemm
def test_screened_draw_equals_brute_force_on_near_ties():
    """Twins of the planted rows differ by 1e-3 .. 1 ulp: the winner among them is decided by float64 rescoring."""
    w, anchors = near_tie_head()
    head = LMHead(w)
    hs = planted_states(w, anchors)
    for k, h in enumerate(hs):
        u = uniforms(100 + k, w.shape[0])
        assert gumbel_sample(head, h, u, 1.0, head.screen_logits(h[None])[0]) == brute_force(head, h, u, 1.0)


def twin_rows_with_equal_noise(sabotage: bool) -> int:
    """Mismatches against the brute force on 80 planted rows, each with a twin 1e-4 apart (below fp16
    resolution) and both given the same, largest noise: the draw is decided by their exact logits alone."""
    w = random_head()
    anchors = torch.arange(0, 8000, 100)
    g = torch.Generator().manual_seed(3)
    for a in anchors:
        w[a + 1] = w[a] * (1 + 1e-4 * torch.randn(D, generator=g))
    head = LMHead(w)
    head.prepare()
    if sabotage:  # an error bound of zero: trusts the fp16 screen as if it were exact
        head.screen = type(head.screen)(head.screen.packed, 0.0)
    mismatches = 0
    for k, (a, h) in enumerate(zip(anchors, planted_states(w, anchors))):
        u = uniforms(k, w.shape[0])
        u[a] = u[a + 1] = 1 - 1e-9
        mismatches += gumbel_sample(head, h, u, 1.0, head.screen_logits(h[None])[0]) != brute_force(head, h, u, 1.0)
    return mismatches


@needs_fbgemm
def test_twins_decided_by_exact_logits():
    assert twin_rows_with_equal_noise(sabotage=False) == 0


@needs_fbgemm
def test_too_small_bound_would_be_caught():
    """The same rows with the error bound cut to zero must disagree somewhere (the test above can fail)."""
    assert twin_rows_with_equal_noise(sabotage=True) > 0


def test_draws_follow_softmax_chi_squared():
    """Small vocabulary (exact float64 logits): 20k draws against softmax(x / T); p-value of Pearson's test."""
    v, t, n = 12, 0.8, 20_000
    w = torch.randn(v, D, generator=torch.Generator().manual_seed(1)) * 0.3
    head = LMHead(w)
    h = torch.randn(D, generator=torch.Generator().manual_seed(2))
    p = torch.softmax(exact_logits(head, h) / t, dim=0)
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(v, dtype=torch.float64)
    u = torch.rand(n, v, generator=gen, dtype=torch.float64)
    for row in u:
        counts[gumbel_sample(head, h, row, t)] += 1
    expected = n * p
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert _chi2_sf(stat, v - 1) > 0.01


def _chi2_sf(x: float, k: int) -> float:
    """Survival function of chi-squared with k degrees of freedom (regularized upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(k / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def test_node_sampler_uses_each_nodes_position_noise():
    v = 16
    head = LMHead(torch.randn(v, D, generator=torch.Generator().manual_seed(4)))
    hidden = torch.randn(3, D, generator=torch.Generator().manual_seed(5))
    seen = []

    class Noise(PositionNoise):
        def gumbel_uniforms(self, d: int) -> torch.Tensor:
            seen.append(d)
            return uniforms(d, v)

    sampler = NodeSampler(head, hidden, torch.tensor([0, 1, 1]), Noise(RequestNoise(0), 0, v), 1.0, None)
    assert sampler(2) == brute_force(head, hidden[2], uniforms(1, v), 1.0)
    assert seen == [1]


def test_position_noise_is_fixed_by_seed_and_position():
    params = SamplingParams(temperature=1.0, seed=7)
    a, b = Request("a", [1], params), Request("b", [2, 3], params)
    b.output_ids = [4, 5]
    at_a, at_b = a.position_noise(100), b.position_noise(100)  # depth d is output position len(output_ids) + d
    assert torch.equal(at_a.gumbel_uniforms(5), b.position_noise(100).gumbel_uniforms(3))
    assert not torch.equal(at_a.gumbel_uniforms(5), at_a.gumbel_uniforms(6))
    assert math.isclose(at_a.uniform(5), at_b.uniform(3))


@pytest.mark.parametrize("params, drafts, path", [
    (dict(temperature=0.0), DraftKind.DETERMINISTIC, HeadPath.ARGMAX),
    (dict(temperature=0.0, repetition_penalty=1.2), DraftKind.DETERMINISTIC, HeadPath.FULL),
    (dict(temperature=1.0), DraftKind.DETERMINISTIC, HeadPath.GUMBEL),
    (dict(temperature=0.7), None, HeadPath.GUMBEL),
    (dict(temperature=1.0), DraftKind.IID, HeadPath.FULL),
    (dict(temperature=1.0, top_p=0.9), DraftKind.DETERMINISTIC, HeadPath.FULL),
    (dict(temperature=1.0, top_k=20), DraftKind.DETERMINISTIC, HeadPath.FULL),
    (dict(temperature=1.0, min_p=0.1), DraftKind.DETERMINISTIC, HeadPath.FULL),
])
def test_head_path(params, drafts, path):
    tree = TokenTree.root(1)
    if drafts is not None:
        q = None if drafts is DraftKind.DETERMINISTIC else torch.full((8,), 1 / 8)
        tree.add_child(0, 3, Proposal(0, drafts, q))
    assert head_path(Request("r", [1], SamplingParams(**params)), tree) is path
