"""Self-speculative (layer-skip) drafting and the vocabulary-truncated draft head.

Oracles: speculative greedy output equals plain greedy output; the target's cache, which the draft shares, equals
a plain prefill of the committed text after every step (the draft leaves nothing behind); with every
layer and the full vocabulary the draft is the target, so every greedy draft is accepted; at T = 1 the first two
sampled tokens follow the target's exact joint (chi-squared) although q is zero on half the vocabulary.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_drafter_model import (CHI_PROMPT, CHI_VOCAB, StubTokenizer, build, chi_squared_p_value, path_table,
                                sample_first_two, sync_target_cache, tiny_llama)
from tiny_hf import hf_model, prefill, twin

from treespec.attention.metadata import single
from treespec.config import DraftSampling, DrafterConfig, EngineConfig, SpecConfig
from treespec.drafters.base import DraftRequest
from treespec.drafters.layer_skip import (LayerBandit, LayerSkipDrafter, LayerSkipView, auto_layer_sets,
                                          layer_sets)
from treespec.drafters.registry import build_drafters
from treespec.engine.engine import LLMEngine
from treespec.engine.request import Request
from treespec.errors import ConfigError
from treespec.models.truncated_head import (REFRESH_TOKENS, TruncatedHead, VocabSubset, load_token_counts,
                                            save_token_counts)
from treespec.sampling import SamplingParams
from treespec.tree import DraftKind, Proposal, TokenTree
from treespec.verify import VerifyResult

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = [[4, 8, 15, 16, 23, 42], [5, 6, 7, 8] * 5, [(13 * i + 7) % 64 for i in range(40)]]


def target_model(family: str):
    """gemma3: 3 layers with sliding windows of 4 and a softcap; llama: 4 plain layers."""
    return twin(hf_model("gemma3", seed=1)) if family == "gemma3" else build(tiny_llama(64, seed=0, layers=4))


def run(target, spec: dict | None, prompts=PROMPTS, params=GREEDY) -> tuple[LLMEngine, list[Request]]:
    spec_cfg = SpecConfig.parse(spec)
    drafters = build_drafters(spec_cfg, target, None)
    engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny", max_num_batched_tokens=64), spec_cfg,
                       drafters)
    reqs = [engine.add_request(p, dataclasses.replace(params)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return engine, reqs


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("vocab", [None, 24], ids=["full_vocab", "truncated_vocab"])
def test_greedy_equals_plain(family, vocab):
    """Auto layer subsets (the bandit switches between them), adaptive depth, trees of branch 2."""
    target = target_model(family)
    _, plain = run(target, None)
    engine, spec = run(target, {"method": "layer_skip", "num_speculative_tokens": 4, "branch": 2, "budget": 8,
                                "draft_vocab_size": vocab})
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert all(len(r.output_ids) == 32 for r in spec)
    assert 0 < engine.stats.num_accepted_tokens < engine.stats.num_draft_tokens  # both outcomes exercised
    d = engine.speculator.drafters[0]
    assert isinstance(d, LayerSkipDrafter) and len(d.arms) >= 2
    assert sum(a.steps > 0 for a in d.bandit.arms) >= 2
    assert not d.plans and all(not a.states for a in d.arms)  # released


def test_greedy_equals_plain_merged_with_ngram():
    """Trees mixing n-gram and layer-skip nodes; the bandit only credits the layer-skip drafter's own nodes."""
    target = target_model("llama")
    _, plain = run(target, None)
    engine, spec = run(target, {"drafters": [{"method": "ngram", "num_speculative_tokens": 4},
                                             {"method": "layer_skip", "layers": [[0, 1, 3], [0, 3]],
                                              "draft_vocab_size": 32, "num_speculative_tokens": 4, "branch": 2}],
                                "budget": 10})
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    bandit = engine.speculator.drafters[1].bandit
    assert engine.stats.num_accepted_tokens > 0 and sum(a.steps for a in bandit.arms) > 0


def test_only_own_nodes_are_credited():
    d = LayerSkipDrafter(DrafterConfig(method="layer_skip", layers=[0]), 1, target_model("llama"))
    tree = TokenTree.root(5)
    ngram, own = Proposal(0, DraftKind.DETERMINISTIC, None), Proposal(1, DraftKind.DETERMINISTIC, None)
    a = tree.add_child(0, 7, ngram)
    b = tree.add_child(a, 8, ngram)
    tree.add_child(a, 9, own)
    c = tree.add_child(0, 6, own)
    tree.add_child(c, 4, own)
    assert d._own_depths(tree, VerifyResult([0, a, b], 3)) == (2, 0)
    assert d._own_depths(tree, VerifyResult([0, c], 3)) == (2, 1)


@pytest.mark.parametrize("family,layers", [("llama", [0, 2, 3]), ("gemma3", [0, 2])])
@pytest.mark.parametrize("quantization", ["none", "fp16"])
def test_target_cache_after_commit_equals_a_plain_prefill(family, layers, quantization):
    """The draft runs on the target's own cache: after every step it holds exactly the target's K/V of the
    committed text (a prefill of it), nothing pending."""
    target = target_model(family)
    spec_cfg = SpecConfig.parse({"method": "layer_skip", "layers": layers, "num_speculative_tokens": 3,
                                 "branch": 2, "quantization": quantization})
    d = LayerSkipDrafter(spec_cfg.drafters[0], 0, target)
    engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny"), spec_cfg, [d])
    reqs = [engine.add_request(p, dataclasses.replace(GREEDY)) for p in PROMPTS[:2]]
    checked = 0
    while engine.has_unfinished():
        engine.step()
        for r in reqs:
            if r.finished or not r.output_ids:
                continue
            n = r.cache.length
            assert r.cache.pending == 0 and n == len(r.all_ids) - 1
            fresh, _ = prefill(target, torch.tensor(r.all_ids[:n]), max_len=n)
            torch.testing.assert_close(r.cache.k[:, :, :n], fresh.k[:, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(r.cache.v[:, :, :n], fresh.v[:, :, :n], rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 10 and engine.stats.num_accepted_tokens > 0


def test_all_layers_full_vocab_accepts_every_greedy_draft():
    target = target_model("llama")
    engine, reqs = run(target, {"method": "layer_skip", "layers": [0, 1, 2, 3], "num_speculative_tokens": 4,
                                "branch": 1, "budget": 4})
    s = engine.stats
    assert s.num_draft_tokens > 0 and s.num_accepted_tokens == s.num_draft_tokens


def test_truncated_draft_proposes_only_subset_tokens():
    target = target_model("llama")
    cfg = DrafterConfig(method="layer_skip", layers=[0, 1], draft_vocab_size=8, num_speculative_tokens=3, branch=3)
    d = LayerSkipDrafter(cfg, 0, target)
    r = Request("a", [1, 2, 3, 1, 2, 3, 9], SamplingParams(temperature=1.0, seed=0, max_tokens=8))
    sync_target_cache(target, r)
    tree = d.propose([DraftRequest(r, 12, 3, DraftSampling.IID, r.position_noise(target.config.vocab_size))])[0]
    subset = set(d.vocab.ids().tolist())
    assert {1, 2, 3, 9} <= subset  # the prompt's tokens were counted
    assert tree.n > 1 and set(tree.tokens[1:].tolist()) <= subset
    for props in tree.proposals:
        for p in props:
            outside = torch.ones(64, dtype=torch.bool)
            outside[list(subset)] = False
            assert float(p.q[outside].sum()) == 0.0 and abs(float(p.q.sum()) - 1.0) < 1e-5


def test_sampled_tokens_follow_the_target_with_a_truncated_vocabulary():
    """T = 1, a 2-layer target drafting with its first layer over half of an 8-token vocabulary."""
    spec = tiny_llama(CHI_VOCAB, seed=11)
    target = build(spec)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    table = path_table(target, CHI_PROMPT, 3, params)
    cfg = DrafterConfig(method="layer_skip", layers=[0], draft_vocab_size=CHI_VOCAB // 2, num_speculative_tokens=2,
                        expansion=[2, 1])
    d = LayerSkipDrafter(cfg, 0, target)
    counts = sample_first_two([d], table, params, DraftSampling.IID, 5_000, rounds=4, target=target)
    assert sum(counts.values()) == 5_000
    assert len(d.vocab.ids()) == CHI_VOCAB // 2
    assert chi_squared_p_value(counts, table) > 0.01


# ---- parts -----------------------------------------------------------------------------------------------------
def test_vocab_subset_counts_ties_and_refresh(tmp_path):
    v = VocabSubset(10, 3)
    assert v.ids().tolist() == [0, 1, 2]  # nothing counted: lowest ids
    v.count([7, 7, 5])
    assert v.ids().tolist() == [0, 1, 2]  # not stale yet: the head slice is not rebuilt every step
    v.count([9] * REFRESH_TOKENS)
    assert v.ids().tolist() == [5, 7, 9]
    tie = VocabSubset(10, 1)
    tie.count([8, 3, 8, 3])
    assert tie.ids().tolist() == [3]  # equal counts: the lower id
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"4": 10, "2": 3}))
    seeded = VocabSubset(10, 2, load_token_counts(str(path), 10))
    assert seeded.ids().tolist() == [2, 4]
    path.write_text(json.dumps([0, 0, 0, 5]))
    assert load_token_counts(str(path), 10)[3] == 5
    assert save_token_counts(path, torch.tensor([4, 4, 9, 4]), 10) == 2  # what `treespec distill` writes
    assert load_token_counts(str(path), 10).tolist() == [0, 0, 0, 0, 3, 0, 0, 0, 0, 1]
    for bad in ({"12": 1}, {"1": -2}, "x"):
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="^draft_vocab_counts: "):
            load_token_counts(str(path), 10)
    with pytest.raises(ConfigError, match="^draft_vocab_counts: cannot read"):
        load_token_counts(str(tmp_path / "missing.json"), 10)


@pytest.mark.parametrize("fp16", [False, True])
def test_truncated_head_equals_the_full_head_on_its_subset(fp16):
    target = twin(hf_model("gemma3", seed=1))  # softcapped head
    subset = VocabSubset(target.config.vocab_size, 20)
    subset.count(list(range(40, 60)))
    head = TruncatedHead(target.lm_head, subset, fp16=fp16)
    h = torch.randn(3, target.config.hidden_size)
    got, want = head.logits(h), target.logits(h)
    ids = subset.ids()
    assert ids.tolist() == list(range(40, 60))
    tol = 2e-2 if head.fp16 else 1e-5
    torch.testing.assert_close(got[:, ids], want[:, ids], rtol=tol, atol=tol)
    outside = torch.ones(target.config.vocab_size, dtype=torch.bool)
    outside[ids] = False
    assert bool(torch.isneginf(got[:, outside]).all())


def test_bandit_prefers_the_better_arm_and_explores():
    bandit = LayerBandit([0.5, 0.25])
    picks = []
    for _ in range(200):
        arm = bandit.choose()
        picks.append(arm)
        bandit.update(arm, accepted=3 if arm == 0 else 0, forwards=4)  # arm 0: 4/3 per step, arm 1: 1/2
    assert picks[:2] == [0, 1]
    assert picks[-50:].count(0) > 40 and picks.count(1) > 2
    off = LayerBandit([0.6, 0.0])  # drafts always rejected: the no-draft arm (cost 0, reward 1) wins
    for _ in range(100):
        arm = off.choose()
        off.update(arm, accepted=0, forwards=4 if arm == 0 else 0)
    assert off.arms[1].steps > 80 and off.arms[0].steps >= 3  # the draft arm is still re-probed


def test_auto_candidates_include_not_drafting_and_costs_count_bytes():
    target = target_model("llama")
    auto = LayerSkipDrafter(DrafterConfig(method="layer_skip"), 0, target)
    assert len(auto.bandit.costs) == len(auto.views) + 1 and auto.bandit.costs[-1] == 0.0
    fixed = LayerSkipDrafter(DrafterConfig(method="layer_skip", layers=[[0, 1, 2, 3], [0, 1]]), 0, target)
    assert len(fixed.bandit.costs) == 2
    assert fixed.views[0].cost == pytest.approx(1.0)  # every layer, full fp32 head (vocab too small to screen)
    assert 0.4 < fixed.views[1].cost < 0.6
    small = LayerSkipDrafter(DrafterConfig(method="layer_skip", layers=[0, 1], draft_vocab_size=16), 0, target)
    assert small.views[0].cost < fixed.views[1].cost


def test_depth_adapts_to_acceptance():
    """HF's rule: +2 when the whole verified depth was accepted, else -1; within [1, num_speculative_tokens]."""
    target = target_model("llama")
    d = LayerSkipDrafter(DrafterConfig(method="layer_skip", layers=[0, 1], num_speculative_tokens=4, branch=1),
                         0, target)
    r = Request("a", [1, 2, 3], GREEDY)
    sync_target_cache(target, r)
    depths = []
    for accept_all in (False, False, False, False, True, True):
        dr = DraftRequest(r, 8, 8, DraftSampling.DETERMINISTIC, r.position_noise(target.config.vocab_size))
        tree = d.propose([dr])[0]
        depths.append(int(tree.depth.max()))
        path = list(range(tree.n)) if accept_all else [0]  # a chain: its nodes in order
        d.observe([dr], [tree], [VerifyResult(path, 0)])
    assert depths == [4, 3, 2, 1, 1, 3]
    steps = d.bandit.arms[0].steps
    noise = r.position_noise(target.config.vocab_size)
    dr = DraftRequest(r, 0, 8, DraftSampling.DETERMINISTIC, noise)  # no node budget: nothing drafted or learned
    tree = d.propose([dr])[0]
    d.observe([dr], [tree], [VerifyResult([0], 0)])
    assert tree.n == 1 and d.bandit.arms[0].steps == steps and d.plans["a"].depth == 4


def test_layer_sets_and_config_errors(monkeypatch):
    assert auto_layer_sets(18)[0] == (0, 2, 4, 6, 8, 10, 12, 14, 16, 17)
    assert auto_layer_sets(18)[1] == (0, 3, 6, 9, 12, 15, 17)
    assert auto_layer_sets(18)[2] == tuple(range(9))
    assert all(len(s) < 4 for s in auto_layer_sets(4)) and auto_layer_sets(1) == [(0,)]
    cfg = DrafterConfig(method="layer_skip", layers=[[0, 1], [0, 3]])
    assert layer_sets(cfg, 4) == [(0, 1), (0, 3)]
    with pytest.raises(ConfigError, match=r"^layers: \[0, 5\] names a layer outside 0..3"):
        LayerSkipDrafter(DrafterConfig(method="layer_skip", layers=[0, 5]), 0, target_model("llama"))
    bad = [({"layers": [2, 1]}, "^layers: "), ({"layers": []}, "^layers: "), ({"layers": [[0], 1]}, "^layers: "),
           ({"layers": [0, "a"]}, "^layers: "), ({"draft_vocab_size": 0}, "^draft_vocab_size: "),
           ({"draft_vocab_counts": "c.json"}, "^draft_vocab_counts: needs draft_vocab_size"),
           ({"quantization": "int4"}, "^quantization: ")]
    for fields, match in bad:
        with pytest.raises(ConfigError, match=match):
            DrafterConfig(method="layer_skip", **fields)
    with pytest.raises(ConfigError, match="^draft_vocab_size: only the layer_skip method"):
        DrafterConfig(method="ngram", draft_vocab_size=8)
    with pytest.raises(ConfigError, match="^quantization: only the layer_skip method"):
        DrafterConfig(method="ngram", quantization="fp16")
    assert layer_sets(DrafterConfig(method="layer_skip", quantization="fp16"), 4) == [(0, 1, 2, 3)]
    with monkeypatch.context() as m:  # a torch build without fbgemm: a clear error, not a crash in a kernel
        m.setattr("treespec.drafters.layer_skip.fp16_ops_available", lambda: False)
        with pytest.raises(ConfigError, match="^quantization: fp16 drafts need fbgemm"):
            LayerSkipDrafter(DrafterConfig(method="layer_skip", quantization="fp16"), 0, target_model("llama"))
    spec = SpecConfig.parse('{"method": "layer_skip", "layers": null, "draft_vocab_size": 32768}')
    assert spec.drafters[0].draft_vocab_size == 32768 and spec.drafters[0].layers is None


def test_view_equals_a_model_built_from_those_layers():
    """The view over layers (0, 3) of a 4-layer Llama == a 2-layer Llama holding those layers' weights."""
    spec = tiny_llama(64, seed=0, layers=4)
    target = build(spec)
    view = LayerSkipView(target, (0, 3))
    renamed = {"model.layers.0.": "model.layers.0.", "model.layers.3.": "model.layers.1."}
    tensors = {}
    for k, v in spec["tensors"].items():
        if not k.startswith("model.layers."):
            tensors[k] = v
        for old, new in renamed.items():
            if k.startswith(old):
                tensors[new + k[len(old):]] = v
    smaller = build({"config": {**spec["config"], "num_hidden_layers": 2}, "tensors": tensors})
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    got_cache = view.new_cache(16)  # the target's layout: the view writes its layers' own indices
    got_cache.reserve(7)
    got = view(ids, torch.arange(7), single(got_cache, 7))
    want_cache, want = prefill(smaller, ids, max_len=16)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(view.logits(got), smaller.logits(want))
    torch.testing.assert_close(got_cache.k[[0, 3], :, :7], want_cache.k[:, :, :7])


def test_a_self_draft_failing_half_way_leaves_the_target_cache_clean(monkeypatch):
    """The draft writes its levels into the target's own cache: a failure after the first level must still drop
    those slots before the target verifies (else the verify forward would attend to them)."""
    from treespec.drafters.model import ModelDrafter
    target = target_model("llama")
    _, plain = run(target, None)
    feed, calls = ModelDrafter._feed, []

    def flaky(self, live):
        calls.append(len(calls))
        if len(calls) % 3 == 2:  # fail on some steps' second level, after the first level wrote its slots
            raise RuntimeError("draft level broke")
        return feed(self, live)

    monkeypatch.setattr(ModelDrafter, "_feed", flaky)
    engine, spec = run(target, {"method": "layer_skip", "layers": [0, 1], "num_speculative_tokens": 3, "budget": 6})
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert len(calls) > 3 and engine.stats.num_draft_tokens > 0
