"""Learned drafters (models/draft_net.py, drafters/learned.py): the runtime network equals its training form
(the same blocks, over unrolled passes instead of a KV cache), and drafting with them never changes what the
target says.

Oracles: the runtime DraftNet over a KV cache (a chain, then a tree node on its parent's guess) gives the training
network's unrolled passes 0 and 1; speculative greedy output equals plain greedy output for a head, an ssm, two
heads and a head merged with n-gram drafting; at T = 1 the first two sampled tokens follow the target's exact
joint (chi-squared) with a head over 6 of the 8 tokens, for i.i.d., without-replacement and one-hot drafting.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from test_drafter_model import (CHI_PROMPT, CHI_VOCAB, StubTokenizer, build, chi_squared_p_value, path_table,
                                tiny_llama)

from treespec.attention.metadata import SeqAttention
from treespec.config import DraftSampling, EngineConfig, SpecConfig
from treespec.distill.net import TrainDraftNet
from treespec.drafters.base import DraftRequest
from treespec.drafters.layer_skip import LayerSkipView
from treespec.drafters.registry import build_drafters
from treespec.engine.engine import LLMEngine
from treespec.engine.request import Request
from treespec.errors import ConfigError
from treespec.models.draft_model import DraftModel
from treespec.models.draft_net import DraftNet, DraftNetConfig, DraftNetKind, load_drafter, save_drafter
from treespec.sampling import SamplingParams
from treespec.tree import DraftKind, Proposal, TokenTree
from treespec.verify import verify_stochastic

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
PROMPTS = [[4, 8, 15, 16, 23, 42], [5, 6, 7, 8] * 5, [(13 * i + 7) % 64 for i in range(90)], [42]]


def train_net(target, kind: DraftNetKind, vocab_ids: torch.Tensor, seed: int = 0) -> TrainDraftNet:
    c = target.config
    cfg = DraftNetConfig(kind, c.hidden_size, c.vocab_size, int(vocab_ids.numel()), num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=48)
    g = torch.Generator().manual_seed(seed)
    return TrainDraftNet(cfg, target.embed_tokens.weight, target.embed_tokens.scale,
                         target.lm_head.weight[vocab_ids], g, target.lm_head.softcap)


def save(net: TrainDraftNet, vocab_ids: torch.Tensor, path) -> str:
    save_drafter(path, net.cfg, net.tensors(), vocab_ids, dtype=torch.float32)
    return str(path)


def target_and_features(vocab: int = 64, n: int = 20):
    target = build(tiny_llama(vocab, seed=0))
    tokens = torch.tensor([(7 * i + 3) % vocab for i in range(n)])
    fresh = target.new_cache(64)
    fresh.reserve(n)
    hidden = target(tokens, torch.arange(n), [SeqAttention(fresh, 0, n)])
    return target, tokens, hidden


def test_runtime_net_equals_training_passes(tmp_path):
    target, x, h = target_and_features()
    ids = torch.arange(0, 64, 2)
    tnet = train_net(target, DraftNetKind.HEAD, ids)
    with torch.no_grad():
        outs = tnet.unrolled(x[None, 1:], h[None, :-1], passes=2)
    cfg, tensors, vids = load_drafter(save(tnet, ids, tmp_path))
    other = train_net(target, DraftNetKind.HEAD, ids, seed=1)
    other.load_tensors(tensors)  # what resuming a collective reads back
    assert all(torch.equal(other.tensors()[k], v) for k, v in tensors.items())
    net = DraftNet(cfg, tensors, vids, target)
    n = x.numel() - 1
    cache = net.new_cache(64)
    cache.reserve(n)
    chain = net(x[1:], torch.arange(n), [SeqAttention(cache, 0, n)], features=h[:-1])
    torch.testing.assert_close(chain, outs[0][0], rtol=1e-4, atol=1e-4)
    for t in (1, 5, n - 1):  # a node one level below root row t-1, fed with that row's output as its feature
        c = net.new_cache(64)
        c.reserve(t)
        net(x[1:t + 1], torch.arange(t), [SeqAttention(c, 0, t)], features=h[:t])
        c.commit()
        c.reserve(1)
        node = net(x[t + 1:t + 2], torch.tensor([t]), [SeqAttention(c, 0, 1)], features=outs[0][0, t - 1:t])
        torch.testing.assert_close(node[0], outs[1][0, t], rtol=1e-4, atol=1e-4)
    logits = net.logits(chain)
    assert torch.isinf(logits[:, 1::2]).all()
    torch.testing.assert_close(logits[:, ids], tnet.logits(outs[0][0]), rtol=1e-3, atol=1e-3)


def test_every_draft_model_kind_implements_the_protocol(tmp_path):
    """ModelDrafter drives CausalLM, LayerSkipView and DraftNet through models/draft_model.py's DraftModel."""
    target = build(tiny_llama(64, seed=0))
    ids = torch.arange(40)
    net = DraftNet(*load_drafter(save(train_net(target, DraftNetKind.SSM, ids), ids, tmp_path)), target)
    views = [LayerSkipView(target, (0,)), LayerSkipView(target, (0,), net.truncated_head)]
    for model in [target, net, *views]:
        assert isinstance(model, DraftModel)
    assert [m.shares_target_cache for m in [target, net, *views]] == [False, False, True, True]
    assert [m.truncated_head is not None for m in [target, net, *views]] == [False, True, False, True]


def run(target, spec: dict | None, prompts=PROMPTS, params=GREEDY):
    spec_cfg = SpecConfig.parse(spec)
    engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny", max_num_batched_tokens=64), spec_cfg,
                       build_drafters(spec_cfg, target, None))
    reqs = [engine.add_request(p, dataclasses.replace(params)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return engine, reqs


@pytest.fixture(scope="module")
def drafter_dirs(tmp_path_factory):
    target = build(tiny_llama(64, seed=0))
    out = {}
    for name, kind, ids, seed in (("head", DraftNetKind.HEAD, torch.arange(40), 0),
                                  ("head_b", DraftNetKind.HEAD, torch.arange(10, 64), 1),
                                  ("ssm", DraftNetKind.SSM, torch.arange(64), 2)):
        out[name] = save(train_net(target, kind, ids, seed), ids, tmp_path_factory.mktemp(name))
    return target, out


CASES = {"head": ["head"], "ssm": ["ssm"], "two_heads": ["head", "head_b"], "head_and_ngram": ["head", "ngram"]}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_plain(drafter_dirs, case):
    target, dirs = drafter_dirs
    drafters = [{"method": "ngram", "num_speculative_tokens": 4} if n == "ngram" else
                {"method": "learned", "model": dirs[n], "num_speculative_tokens": 4, "branch": 2} for n in CASES[case]]
    _, plain = run(target, None)
    engine, spec = run(target, {"drafters": drafters, "budget": 8})
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert engine.stats.num_draft_tokens > 0


def test_seeded_one_hot_head_sampling_equals_plain_without_full_vocabulary_rows(drafter_dirs, monkeypatch):
    """At T > 0 one-hot head drafts are ranked over the head's own vocabulary subset (never its full-vocabulary
    logits) and verified by Gumbel-max draws with (seed, position) noise: seeded output equals plain sampling."""
    target, dirs = drafter_dirs
    params = SamplingParams(temperature=0.5, seed=3, max_tokens=24, ignore_eos=True)
    _, plain = run(target, None, params=params)
    monkeypatch.setattr(DraftNet, "logits", lambda self, hidden: pytest.fail("full-vocabulary draft rows built"))
    engine, spec = run(target, {"method": "learned", "model": dirs["head"], "num_speculative_tokens": 3,
                                "branch": 2, "budget": 6, "draft_sampling": "deterministic"}, params=params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert engine.stats.num_draft_tokens > 0


def test_head_drafts_every_step_once_features_arrive(drafter_dirs):
    """The engine shares prefill and accepted-path features, so a head never runs out of them."""
    target, dirs = drafter_dirs
    engine, reqs = run(target, {"method": "learned", "model": dirs["head"], "num_speculative_tokens": 3,
                                "branch": 1, "budget": 3}, prompts=PROMPTS[:2])
    for r in reqs:  # (the last step has no room left for a draft)
        assert r.metrics.num_drafts == r.metrics.num_steps - 1


def test_bad_drafter_dirs_are_config_errors(tmp_path, drafter_dirs):
    target, dirs = drafter_dirs
    with pytest.raises(ConfigError, match="model"):
        build_drafters(SpecConfig.parse({"method": "learned", "model": str(tmp_path)}), target, None)
    cfg, tensors, ids = load_drafter(dirs["head"])
    tensors.pop("fc.weight")
    save_drafter(tmp_path / "broken", cfg, tensors, ids)
    with pytest.raises(ConfigError, match="fc.weight"):
        load_drafter(tmp_path / "broken")
    other = build(tiny_llama(32, seed=0))
    with pytest.raises(ConfigError, match="vocabulary"):
        build_drafters(SpecConfig.parse({"method": "learned", "model": dirs["head"]}), other, None)
    with pytest.raises(ConfigError, match="model"):
        SpecConfig.parse({"method": "learned"})


# ---- T = 1 ----------------------------------------------------------------------------------------------------
def hidden_table(model, prompt: list[int], depth: int) -> tuple[torch.Tensor, dict[tuple, torch.Tensor]]:
    """The target's hidden states of the prompt (all but the root) and at the end of every token path."""
    tree, frontier = TokenTree.root(prompt[-1]), [0]
    for _ in range(depth):
        frontier = [tree.add_child(u, t, Proposal(0, DraftKind.DETERMINISTIC, None))
                    for u in frontier for t in range(CHI_VOCAB)]
    n = len(prompt) - 1
    cache = model.new_cache(n + tree.n)
    cache.reserve(n)
    prompt_h = model(torch.tensor(prompt[:-1]), torch.arange(n), [SeqAttention(cache, 0, n)])
    cache.commit()
    cache.reserve(tree.n)
    h = model(tree.tokens, n + tree.depth, [SeqAttention(cache, 0, tree.n, tree.ancestor_mask())])
    return prompt_h, {tuple(tree.tokens[tree.path_to(u)[1:]].tolist()): h[u] for u in range(tree.n)}


def sample_first_two_with_features(drafter, table, hidden, params, sampling, samples: int) -> Counter:
    prompt_h, path_h = hidden
    reqs = [Request(f"s{i}", list(CHI_PROMPT), dataclasses.replace(params, seed=i)) for i in range(samples)]
    for r in reqs:
        drafter.observe_features(r, 0, prompt_h)
    first: dict[int, tuple] = {}
    todo = list(range(samples))
    while todo:
        batch = [DraftRequest(reqs[i], 6, 1 if reqs[i].output_ids else 2, sampling,
                              reqs[i].position_noise(CHI_VOCAB)) for i in todo]
        trees = drafter.propose(batch)
        results = []
        for i, tree in zip(todo, trees):
            r = reqs[i]
            rows = torch.stack([table[tuple(r.output_ids) + tuple(tree.tokens[tree.path_to(u)[1:]].tolist())]
                                for u in range(tree.n)])
            results.append(verify_stochastic(tree, rows, r.generator))
        drafter.observe(batch, trees, results)
        for i, tree, res in zip(todo, trees, results):
            r, before = reqs[i], tuple(reqs[i].output_ids)
            accepted = tree.tokens[res.path[1:]].tolist()
            drafter.observe_features(r, len(CHI_PROMPT) - 1 + len(before),
                                     torch.stack([path_h[before + tuple(accepted[:k])] for k in range(len(res.path))]))
            r.output_ids += accepted + [res.bonus_token]
            if len(r.output_ids) >= 2:
                first[i] = tuple(r.output_ids[:2])
        todo = [i for i in todo if i not in first]
    return Counter(first.values())


@pytest.mark.parametrize("sampling", list(DraftSampling), ids=lambda s: s.value)
def test_sampled_tokens_follow_the_target(sampling, tmp_path):
    target = build(tiny_llama(CHI_VOCAB, seed=11))
    params = SamplingParams(temperature=1.0, max_tokens=8)
    table = path_table(target, CHI_PROMPT, 3, params)
    hidden = hidden_table(target, CHI_PROMPT, 3)
    ids = torch.tensor([0, 1, 2, 4, 5, 7])
    path = save(train_net(target, DraftNetKind.HEAD, ids, seed=3), ids, tmp_path)
    spec = SpecConfig.parse({"method": "learned", "model": path, "num_speculative_tokens": 2, "expansion": [2, 1]})
    drafter = build_drafters(spec, target, None)[0]
    counts = sample_first_two_with_features(drafter, table, hidden, params, sampling, 20_000)
    assert sum(counts.values()) == 20_000
    assert chi_squared_p_value(counts, table) > 0.01


def test_shipped_drafter_is_small_and_found_for_the_default_model():
    from treespec.drafters.registry import SHIPPED_DIR, shipped_drafters
    from treespec.weights.loader import resolve_model
    shipped = SHIPPED_DIR / "gemma-3-270m"
    assert sum(f.stat().st_size for f in shipped.iterdir()) <= 25 * 2**20
    cfg, tensors, ids = load_drafter(shipped)
    assert cfg.kind is DraftNetKind.HEAD and cfg.target == "gemma-3-270m" and ids.numel() == cfg.draft_vocab_size
    assert shipped_drafters(resolve_model("gemma-3-270m")) == [shipped]


@pytest.mark.parametrize("name", ["head", "ssm"])
def test_one_token_prompt_drafts_nothing_first_then_drafts(drafter_dirs, name, caplog):
    """A 1-token prompt leaves the draft's context (the request's tokens minus the first) empty on the first step:
    propose returns the bare root instead of failing, and drafting starts once a token has been generated."""
    target, dirs = drafter_dirs
    spec = SpecConfig.parse({"method": "learned", "model": dirs[name], "num_speculative_tokens": 3, "branch": 2})
    (drafter,) = build_drafters(spec, target, None)
    req = Request("one", [42], dataclasses.replace(GREEDY))
    req.cache = target.new_cache(64)
    (tree,) = drafter.propose([DraftRequest(req, max_nodes=4, max_depth=3, sampling=DraftSampling.DETERMINISTIC,
                                            noise=None)])
    assert tree.n == 1 and int(tree.tokens[0]) == 42
    _, plain = run(target, None, prompts=[[42]])
    with caplog.at_level("WARNING"):
        engine, spec_reqs = run(target, {"method": "learned", "model": dirs[name], "num_speculative_tokens": 3,
                                         "branch": 2, "budget": 6}, prompts=[[42]])
    assert "failed" not in caplog.text
    assert spec_reqs[0].output_ids == plain[0].output_ids and engine.stats.num_draft_tokens > 0
