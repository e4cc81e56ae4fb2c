"""Tree sizing: the cost curve, node allocation across requests, pruning, measurement and its cache."""
import json

import pytest
import torch
from tiny_hf import hf_model, twin

from treespec.engine.cost_model import CostCurve, CostModel, allocate_nodes
from treespec.tree.build import prune_tree
from treespec.tree.token_tree import DraftKind, Proposal, TokenTree


def test_curve_interpolates_and_never_decreases():
    c = CostCurve({1: 1.0, 4: 4.0, 8: 3.0})  # a noisy point (8 cheaper than 4) is lifted
    assert c(1) == 1.0 and c(2) == 2.0 and c(8) == 4.0
    assert c(16) >= c(8)


def test_flat_cost_takes_every_useful_node_steep_cost_none():
    scores = [torch.tensor([0.9, 0.8, 0.1]), torch.tensor([0.5])]
    flat = CostCurve({1: 1.0, 64: 1.0})
    assert allocate_nodes(scores, flat, 0.0, budget=64) == [3, 1]
    steep = CostCurve({1: 1.0, 2: 2.0, 64: 64.0})  # each node costs a whole step: never worth it
    assert allocate_nodes(scores, steep, 0.0, budget=64) == [0, 0]


def test_allocation_prefers_the_best_nodes_and_respects_the_budget():
    scores = [torch.tensor([0.9, 0.2]), torch.tensor([0.6, 0.5])]
    flat = CostCurve({1: 1.0, 64: 1.0})
    assert allocate_nodes(scores, flat, 0.0, budget=2 + 2) == [1, 1]  # roots use 2 of the 4
    # a node is worth it while its gain beats the marginal cost: 0.9 and 0.6 are, 0.5 and 0.2 are not
    mild = CostCurve({2: 1.0, 6: 1.8})
    assert allocate_nodes(scores, mild, 0.0, budget=6) == [1, 1]


def _chain_tree() -> TokenTree:
    t = TokenTree.root(1)
    p = Proposal(0, DraftKind.DETERMINISTIC, None)
    a = t.add_child(0, 2, p, score=0.9)
    t.add_child(a, 3, p, score=0.5)
    t.add_child(0, 4, p, score=0.7)
    return t


def test_prune_keeps_best_nodes_connected():
    t = prune_tree(_chain_tree(), 2)
    t.validate()
    assert t.tokens.tolist() == [1, 2, 4] and t.parents.tolist() == [-1, 0, 0]
    assert t.dropped[1] and t.dropped[1][0][0] == 3  # the pruned proposal stays as a dropped stage


def test_measure_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    model = twin(hf_model("llama"))
    cm = CostModel.load_or_measure(model, "tiny")
    for curve in (cm.greedy, cm.sampled):
        assert all(t > 0 for t in curve.ts) and curve.ns[0] == 1
    (cached,) = tmp_path.glob("cost-*.json")
    assert set(json.loads(cached.read_text())) == {"greedy", "sampled"}
    again = CostModel.load_or_measure(model, "tiny")
    assert again.greedy.as_dict() == cm.greedy.as_dict()  # read back, not re-measured


def test_observed_steps_confirm_or_correct_a_point_and_one_spike_does_not():
    c = CostCurve({1: 1.0, 2: 10.0, 4: 20.0})
    for t in (1.1, 0.9, 1.0):  # within a factor 2: confirmed, unchanged
        assert not c.observe(1, t)
    assert c.points[1] == 1.0 and 1 in c.confirmed
    # probes at n = 2 between ordinary steps at n = 1 (as the engine makes them); one slow spike: the median holds
    assert not c.observe(2, 1.0) and not c.observe(1, 1.0) and not c.observe(2, 50.0) and not c.observe(1, 1.0)
    assert c.observe(2, 1.2) and 1.0 < c(2) < 1.5  # 10x too pessimistic against n = 1's steps: corrected
    assert c(4) == 20.0 and 2 not in c.confirmed


def test_a_busy_spell_that_slows_every_size_alike_corrects_nothing():
    c = CostCurve({1: 1.0, 2: 1.2, 4: 1.5})
    for n in (1, 2, 4) * 3:
        c.observe(n, c(n))
    for n in (1, 2, 4) * 4:  # the machine gets 5x slower for every size
        assert not c.observe(n, 5 * c(n))
    assert c.as_dict() == {1: 1.0, 2: 1.2, 4: 1.5}


def test_one_token_steps_among_trees_never_rescale_the_one_token_cost():
    """The correction compares sizes with each other, so it cannot tell which of two drifted: when most steps
    verify 8-node trees whose cost the curve overstates, the rare one-token steps look slow against them. c(1), the
    plain step, stays the anchor and measures the load; rescaling it (to 2.0 here, and c(2), c(4) with it by the
    curve's smoothing) made every tree look cheap and speculation slower. The point that drifted is corrected."""
    c = CostCurve({1: 1.0, 2: 1.2, 4: 1.9, 8: 6.0})  # the truth: c(8) = 3.0
    for _ in range(6):
        for n in (8, 8, 1):
            c.observe(n, 3.0 if n == 8 else 1.0)
    assert c.points[1] == 1.0 and c(2) == 1.2 and c(4) == 1.9 and c(8) == 3.0


def test_probe_size_is_the_next_unconfirmed_grid_point():
    c = CostCurve({1: 1.0, 2: 1.0, 4: 1.0})
    assert c.probe_size(1) == 2 and c.probe_size(3) == 4 and c.probe_size(4) is None
    for _ in range(3):
        c.observe(2, 1.0)
    assert c.probe_size(1) is None and c.probe_size(2) == 4


class FakeClock:
    """Stands in for the engine's `time`: a verify over n query tokens takes c(n) = 1 ms + 0.05 ms x n, so the
    test reads the correction's logic, not this (shared, noisy) machine's timings."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    @staticmethod
    def cost(n: int) -> float:
        return 1e-3 + 5e-5 * n


def test_a_cached_curve_ten_times_too_pessimistic_does_not_keep_speculation_off(tmp_path, monkeypatch):
    """A curve measured while the machine was busy makes every draft node look too expensive; the engine's own
    verify times (and probes one grid size up) correct it within a few steps, and the correction is cached."""
    from serving_tiny import tiny_tokenizer

    import treespec.engine.engine as engine_module
    from treespec.config import EngineConfig, SpecConfig
    from treespec.drafters.registry import build_drafters
    from treespec.engine.engine import LLMEngine
    from treespec.sampling import SamplingParams
    model = twin(hf_model("gemma3"))  # its greedy output repeats one token: every n-gram draft is accepted
    clock = FakeClock()
    pessimistic = {k: {n: clock.cost(n) * (10.0 if n > 1 else 1.0) for n in (1, 2, 4, 8, 16, 64)}
                   for k in ("greedy", "sampled")}
    path = tmp_path / "cost.json"
    cost = CostModel(**pessimistic, path=path)
    assert allocate_nodes([torch.tensor([0.9, 0.9, 0.9])], cost.greedy, 0.0, budget=64) == [0]  # speculation off
    tok = tiny_tokenizer()
    spec = SpecConfig.parse({"method": "ngram"})
    engine = LLMEngine(model, tok, EngineConfig(model="tiny"), spec, build_drafters(spec, model, tok), cost)
    forward = engine.runner.forward

    def timed_forward(prefills, trees):
        clock.now += clock.cost(sum(w.tree.n for w in trees))
        return forward(prefills, trees)

    monkeypatch.setattr(engine_module, "time", clock)
    monkeypatch.setattr(engine.runner, "forward", timed_forward)
    req = engine.add_request([5, 6, 7, 8] * 6, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    steps_to_first_correction = None
    while engine.has_unfinished():
        engine.step()
        if steps_to_first_correction is None and path.exists():
            steps_to_first_correction = req.metrics.num_steps
    assert steps_to_first_correction is not None and steps_to_first_correction <= 16
    assert req.metrics.mean_tokens_per_step > 2, req.metrics  # 1.00 before the correction existed
    cached = {k: {int(n): t for n, t in v.items()} for k, v in json.loads(path.read_text()).items()}
    assert cached == cost.as_dict() != CostModel(**pessimistic).as_dict()  # the corrected curve is written back
