"""Tree sizing: the cost curve, node allocation across requests, pruning, measurement and its cache."""
import json

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
