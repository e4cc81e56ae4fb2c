"""The draft-model drafter (SpecInfer's SSM): trees, draft KV cache, vocabulary checks, exact sampling end to end.

Oracles: the batched, level-by-level drafter builds the same tree as treespec.tree.build's per-tree builders fed by
a fresh plain prefill of every node's context; the draft cache after commit equals a plain prefill of the
committed text; sampled continuations follow the target's own distribution (chi-squared against the exact joint
of the first two tokens, which the tiny vocabulary makes enumerable).
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import transformers as tf
from serving_tiny import save_tiny_model_dir, tiny_backend
from tiny_hf import StubTokenizer, hf_model, prefill, twin

from treespec.attention.metadata import single
from treespec.config import DraftSampling, DrafterConfig, EngineConfig, SpecConfig
from treespec.drafters.base import DraftRequest
from treespec.drafters.model import ModelDrafter, check_vocabulary, fit_vocabulary
from treespec.drafters.ngram import NgramDrafter
from treespec.drafters.registry import build_drafters
from treespec.engine.engine import LLMEngine
from treespec.engine.request import Request
from treespec.errors import ConfigError
from treespec.models import CausalLM, build_model
from treespec.sampling import SamplingParams, apply_penalties, logits_to_probs
from treespec.tokenizer import Tokenizer
from treespec.tree import DraftKind, Proposal, TokenTree, expand_static, grow_best_first, merge_trees
from treespec.verify import VerifyResult, verify_stochastic

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


def tiny_llama(vocab: int, seed: int, layers: int = 2, max_len: int = 512) -> dict[str, object]:
    """(HF config dict, state dict) of a tiny random Llama; a wide init keeps greedy choices clear of ties."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
                         initializer_range=0.3)
    return {"config": cfg.to_dict(), "tensors": tf.LlamaForCausalLM(cfg).state_dict()}


def build(spec: dict[str, object]) -> CausalLM:
    return build_model(spec["config"], spec["tensors"])


def perturbed(spec: dict[str, object], noise: float, seed: int, layers: int | None = None) -> CausalLM:
    """A different model that still agrees with `spec` often: its first `layers` layers, weights plus noise."""
    g = torch.Generator().manual_seed(seed)
    config = dict(spec["config"])
    keep = config["num_hidden_layers"] if layers is None else layers
    config["num_hidden_layers"] = keep
    tensors = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.dim() > 1 else v
               for k, v in spec["tensors"].items()
               if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep}
    return build_model(config, tensors)


def drafter(model: CausalLM, vocab: int, drafter_id: int = 0, **cfg) -> ModelDrafter:
    return ModelDrafter(DrafterConfig(method="draft_model", model="tiny", **cfg), drafter_id, model, vocab)


def request(prompt: list[int], params: SamplingParams, rid: str) -> Request:
    return Request(rid, list(prompt), params)


@torch.no_grad()
def sync_target_cache(target: CausalLM, r: Request) -> None:
    """Give r the target's cache of its committed context (all but the root), as the engine keeps it: what a
    self-draft sharing the target's cache reads."""
    if r.cache is None:
        r.cache = target.new_cache(64)
    new = r.all_ids[r.cache.length:-1]
    if new:
        r.cache.reserve(len(new))
        target(torch.tensor(new), r.cache.length + torch.arange(len(new)), single(r.cache, len(new)))
        r.cache.commit()


# ---- slow twin: per-tree builders fed by fresh plain prefills ---------------------------------------------------
def fresh_step(model: CausalLM, r: Request, vocab: int):
    """build.py's step function: q at each node from a plain prefill of the request's context + the node's path."""
    def step(tree: TokenTree, nodes: list[int]) -> torch.Tensor:
        rows = []
        for u in nodes:
            path = tree.tokens[tree.path_to(u)[1:]].tolist()
            ids = torch.tensor(r.all_ids + path)
            _, h = prefill(model, ids, max_len=len(ids))
            logits = fit_vocabulary(model.logits(h[-1:]), vocab)
            logits = apply_penalties(logits, r.params, r.prompt_ids, [r.output_ids + path])
            rows.append(torch.softmax(logits, -1)[0] if r.params.greedy else logits_to_probs(logits, r.params)[0])
        return torch.stack(rows)
    return step


def assert_same_tree(got: TokenTree, want: TokenTree) -> None:
    got.validate()
    assert got.tokens.tolist() == want.tokens.tolist()
    assert got.parents.tolist() == want.parents.tolist()
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-7)
    for i in range(got.n):
        a, b = got.stages(i), want.stages(i)
        assert [(s.token, s.child, s.proposal.kind, s.proposal.order) for s in a] == \
               [(s.token, s.child, s.proposal.kind, s.proposal.order) for s in b]
        for s, t in zip(a, b):
            assert (s.proposal.q is None) == (t.proposal.q is None)
            if s.proposal.q is not None:
                torch.testing.assert_close(s.proposal.q, t.proposal.q, rtol=1e-4, atol=1e-6)


GROWTHS = {"chain": dict(num_speculative_tokens=4, branch=1),
           "static": dict(num_speculative_tokens=3, expansion=[2, 1, 3]),
           "best_first": dict(num_speculative_tokens=4, branch=3)}
PARAMS = {"greedy": (GREEDY, DraftSampling.DETERMINISTIC),
          "iid_penalties": (SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.3, seed=3, max_tokens=64),
                            DraftSampling.IID),
          "swor_top_p": (SamplingParams(temperature=1.2, top_p=0.9, frequency_penalty=0.5, seed=4, max_tokens=64),
                         DraftSampling.WITHOUT_REPLACEMENT),
          "deterministic": (SamplingParams(temperature=0.7, min_p=0.05, seed=5, max_tokens=64),
                            DraftSampling.DETERMINISTIC)}


def family_model(family: str) -> CausalLM:
    """llama: long context (a prompt longer than a catch-up chunk); gemma3: sliding windows of 4 in the draft."""
    return build(tiny_llama(64, seed=1)) if family == "llama" else twin(hf_model("gemma3", seed=1))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("growth", list(GROWTHS))
@pytest.mark.parametrize("mode", list(PARAMS))
def test_batched_trees_equal_per_tree_builders_on_fresh_prefills(family, growth, mode):
    """Several requests (one longer than a catch-up chunk) drafted together, their trees grown level by level
    over pending KV slots, equal the per-tree builders whose every q comes from a plain prefill."""
    model = family_model(family)
    vocab, max_nodes = model.config.vocab_size, 9
    params, sampling = PARAMS[mode]
    long = 300 if model.config.max_position_embeddings > 320 else 120
    prompts = [[5, 9, 2], [(7 * i) % vocab for i in range(long)], [3, 1, 4, 1, 5, 9, 2, 6]]
    reqs = [request(p, dataclasses.replace(params), f"r{i}") for i, p in enumerate(prompts)]
    reqs[2].output_ids = [8, 8, 3]  # output tokens: penalties see them, the catch-up feeds them
    d = drafter(model, vocab, drafter_id=2, **GROWTHS[growth])
    got = d.propose([DraftRequest(r, max_nodes, 8, sampling, r.position_noise(vocab)) for r in reqs])
    cfg = d.cfg
    for r, tree in zip(reqs, got):
        twin_r = request(r.prompt_ids, dataclasses.replace(params), "twin")
        twin_r.output_ids = list(r.output_ids)
        kind = DraftKind.DETERMINISTIC if params.greedy else DraftKind(sampling.value)
        step = fresh_step(model, twin_r, vocab)
        if cfg.expansion is not None:
            want = expand_static(step, r.root_token, cfg.expansion, kind, twin_r.generator, drafter=2)
            want = want.select([0] + sorted(sorted(range(1, want.n), key=lambda i: (-float(want.scores[i]), i))
                                            [:max_nodes]))
        else:
            want = grow_best_first(step, r.root_token, max_nodes, cfg.num_speculative_tokens, cfg.branch, kind,
                                   twin_r.generator, drafter=2)
        assert tree.n > 1
        assert_same_tree(tree, want)


# ---- the draft's KV cache --------------------------------------------------------------------------------------
def committed_kv_matches_prefill(model: CausalLM, cache, ids: list[int]) -> None:
    fresh, _ = prefill(model, torch.tensor(ids[:cache.length]), max_len=cache.length)
    length = cache.length
    torch.testing.assert_close(cache.k[:, :, :length], fresh.k[:, :, :length], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :length], fresh.v[:, :, :length], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("draft_family", ["llama", "gemma3"])  # gemma3: sliding windows of 4 in the draft
@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, seed=7, max_tokens=64)],
                         ids=["greedy", "sampled"])
def test_draft_kv_after_commit_equals_plain_prefill(draft_family, params):
    """After every step the draft cache holds exactly the committed text (minus what it has not seen), and it
    only has to catch up on tokens it did not draft: the root, plus an accepted leaf it never fed."""
    hf_target = hf_model("llama", seed=0)
    target = twin(hf_target)
    if draft_family == "llama":  # the target's weights plus noise: accepts some drafts, rejects others
        draft = perturbed({"config": hf_target.config.to_dict(), "tensors": hf_target.state_dict()}, 0.1, seed=1)
    else:
        draft = twin(hf_model("gemma3", seed=2))
    spec = SpecConfig.parse({"method": "draft_model", "model": "tiny", "num_speculative_tokens": 3, "branch": 1})
    d = ModelDrafter(spec.drafters[0], 0, draft, target.config.vocab_size)
    engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny"), spec, [d])
    reqs = [engine.add_request([4, 8, 15, 16, 23, 42], params), engine.add_request(list(range(30, 50)), params)]
    accepted_deep = 0
    while engine.has_unfinished():
        engine.step()
        for r in reqs:
            st = d.states.get(r.request_id)
            if st is None:
                continue
            committed_kv_matches_prefill(draft, st.cache, r.all_ids)
            assert st.cache.pending == 0
            assert len(r.all_ids) - 1 - st.cache.length in (0, 1)
            accepted_deep += len(r.all_ids) - 1 - st.cache.length == 1
    assert all(len(r.output_ids) == 64 for r in reqs)
    assert not d.states  # released
    if draft_family == "llama":
        assert sum(r.metrics.num_accepted_tokens for r in reqs) > 0 and accepted_deep > 0


@pytest.mark.parametrize("sampling", list(DraftSampling), ids=lambda s: s.value)
def test_engine_samples_with_every_draft_sampling(sampling):
    """Sampled requests run through the engine with an SSM and the n-gram drafter merged; seeded runs repeat."""
    spec_target = tiny_llama(64, seed=0)
    target, draft = build(spec_target), perturbed(spec_target, 0.1, seed=1)
    spec = SpecConfig.parse({"drafters": [{"method": "ngram", "num_speculative_tokens": 3},
                                          {"method": "draft_model", "model": "tiny", "num_speculative_tokens": 3}],
                             "draft_sampling": sampling.value})
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=11)

    def run() -> list[Request]:
        drafters = [NgramDrafter(spec.drafters[0], 0), ModelDrafter(spec.drafters[1], 1, draft, 64)]
        engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny"), spec, drafters)
        reqs = [engine.add_request(p, params) for p in ([1, 2, 3, 1, 2, 3, 1], [9, 8, 7, 6, 5])]
        while engine.has_unfinished():
            engine.step()
        return reqs

    first, second = run(), run()
    assert [r.output_ids for r in first] == [r.output_ids for r in second]
    assert all(len(r.output_ids) == 24 and r.error is None for r in first)
    assert sum(r.metrics.num_accepted_tokens for r in first) > 0


def test_unobserved_step_is_discarded():
    """A proposal the engine never verified (its forward failed) leaves no pending slots behind."""
    model = twin(hf_model("llama", seed=1))
    d = drafter(model, model.config.vocab_size, num_speculative_tokens=3, branch=2)
    r = request([1, 2, 3, 4], GREEDY, "a")
    dr = DraftRequest(r, 6, 3, DraftSampling.DETERMINISTIC, r.position_noise(model.config.vocab_size))
    first = d.propose([dr])[0]
    assert d.states["a"].cache.pending > 0
    again = d.propose([dr])[0]
    assert again.tokens.tolist() == first.tokens.tolist()
    d.observe([dr], [again], [VerifyResult([0], 0)])
    assert d.states["a"].cache.length == 4 and d.states["a"].cache.pending == 0


def test_draft_context_length_limits_depth():
    """Near the end of the draft's own context the trees get shallower, then bare roots; nothing overflows."""
    spec = tiny_llama(32, seed=0, max_len=24)
    d = drafter(build(spec), 32, num_speculative_tokens=4, branch=2)
    depths = []
    for length in (10, 19, 21, 23, 24, 25, 30):
        r = request([i % 32 for i in range(length)], GREEDY, f"r{length}")
        tree = d.propose([DraftRequest(r, 20, 4, DraftSampling.DETERMINISTIC, r.position_noise(32))])[0]
        depths.append(int(tree.depth.max()))
        d.release(r)
    assert depths == [4, 3, 2, 1, 1, 0, 0]


# ---- vocabulary ------------------------------------------------------------------------------------------------
class Vocab:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tokens[i]


def test_vocabulary_check():
    a = Vocab(["<s>", "a", "b", "c"])
    check_vocabulary(a, Vocab(list(a.tokens)), 4, 8)  # padded embedding rows are fine
    check_vocabulary(None, None, 8, 8)
    with pytest.raises(ConfigError, match=r"^model: token 2 is 'x'"):
        check_vocabulary(a, Vocab(["<s>", "a", "x", "c"]), 4, 4)
    with pytest.raises(ConfigError, match=r"^model: .*5 tokens, the target's 4"):
        check_vocabulary(a, Vocab(a.tokens + ["d"]), 8, 8)
    with pytest.raises(ConfigError, match=r"^model: .*only 3 rows"):
        check_vocabulary(a, Vocab(list(a.tokens)), 4, 3)
    with pytest.raises(ConfigError, match=r"^model: the draft's vocabulary has 6 tokens, the target's 4"):
        check_vocabulary(None, a, 4, 6)


def test_padded_draft_vocabulary_maps_onto_the_target():
    """A draft with extra padding rows proposes only target ids; q rows span the target's vocabulary."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0]])
    assert fit_vocabulary(logits, 3).tolist() == [[0.0, 1.0, 2.0]]
    assert fit_vocabulary(logits, 5)[0, 4] == float("-inf")
    spec = tiny_llama(40, seed=3)
    spec["tensors"]["lm_head.weight"][32:] = 0.0
    spec["tensors"]["lm_head.weight"][32:, 0] = 1e4  # the padding rows would win every argmax
    d = drafter(build(spec), 32, num_speculative_tokens=3, branch=3)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=8)
    r = request([1, 2, 3], params, "a")
    tree = d.propose([DraftRequest(r, 12, 3, DraftSampling.IID, r.position_noise(32))])[0]
    assert tree.n > 1 and int(tree.tokens.max()) < 32
    assert all(p.q.shape == (32,) for props in tree.proposals for p in props)


def test_load_through_the_registry(tmp_path):
    """`draft_model` entries load an SSM from disk; a different tokenizer or a bad path is refused naming `model`."""
    target_dir = save_tiny_model_dir(tmp_path / "target")
    tokenizer = Tokenizer.from_hf_dir(target_dir)
    target = build(tiny_llama(tokenizer.vocab_size, seed=0))
    spec = SpecConfig.parse({"drafters": [{"method": "draft_model", "model": str(target_dir)},
                                          {"method": "draft_model", "model": str(target_dir), "branch": 2}]})
    drafters = build_drafters(spec, target, tokenizer)
    assert [type(x) for x in drafters] == [ModelDrafter, ModelDrafter]
    assert [x.drafter_id for x in drafters] == [0, 1] and drafters[1].cfg.branch == 2

    other = save_tiny_model_dir(tmp_path / "other")
    backend = tiny_backend()
    backend.add_tokens(["zzz-not-in-the-target"])
    backend.save(str(other / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"^model: the draft's tokenizer has"):
        build_drafters(SpecConfig.parse({"method": "draft_model", "model": str(other)}), target, tokenizer)
    with pytest.raises(ConfigError, match=r"^model: "):
        build_drafters(SpecConfig.parse({"method": "draft_model", "model": str(tmp_path / "none")}), target,
                       tokenizer)


# ---- exact sampling end to end ---------------------------------------------------------------------------------
CHI_VOCAB = 8
CHI_PROMPT = [1, 5, 2, 7]


def chi_models() -> tuple[CausalLM, CausalLM]:
    """A 2-layer target and a 1-layer SSM derived from it (a cheap draft: the tests draw 60k+ samples)."""
    spec = tiny_llama(CHI_VOCAB, seed=11)
    return build(spec), perturbed(spec, 0.5, seed=12, layers=1)


def path_table(model: CausalLM, prompt: list[int], depth: int, params: SamplingParams) -> dict[tuple, torch.Tensor]:
    """p after the prompt and every token path of length <= depth: one forward over the full V-ary tree."""
    tree, frontier = TokenTree.root(prompt[-1]), [0]
    for _ in range(depth):
        frontier = [tree.add_child(u, t, Proposal(0, DraftKind.DETERMINISTIC, None))
                    for u in frontier for t in range(CHI_VOCAB)]
    cache, _ = prefill(model, torch.tensor(prompt[:-1]), max_len=len(prompt) + tree.n)
    cache.reserve(tree.n)
    h = model(tree.tokens, cache.length + tree.depth, single(cache, tree.n, tree.ancestor_mask()))
    probs = logits_to_probs(model.logits(h), params)
    return {tuple(tree.tokens[tree.path_to(u)[1:]].tolist()): probs[u] for u in range(tree.n)}


def sample_first_two(drafters: list[ModelDrafter], table, params, sampling: DraftSampling, samples: int,
                     kind_override: DraftKind | None = None, rounds: int = 8,
                     target: CausalLM | None = None) -> Counter:
    """Counts of the first two emitted tokens over `samples` requests, drafted in batches and verified exactly
    (`target`: keep each request's target cache, for self-drafts that read it)."""
    counts: Counter = Counter()
    per_round = samples // rounds
    for k in range(rounds):
        reqs = [request(CHI_PROMPT, dataclasses.replace(params, seed=k * per_round + i), f"s{i}")
                for i in range(per_round)]
        first: dict[int, int] = {}
        todo = list(range(per_round))
        while todo:
            if target is not None:
                for i in todo:
                    sync_target_cache(target, reqs[i])
            batch = [DraftRequest(reqs[i], 6, 1 if reqs[i].output_ids else 2, sampling,
                                  reqs[i].position_noise(CHI_VOCAB)) for i in todo]
            proposed = [d.propose(batch) for d in drafters]
            trees = proposed[0] if len(drafters) == 1 else [merge_trees(list(ts)) for ts in zip(*proposed)]
            results = []
            for i, tree in zip(todo, trees):
                if kind_override is not None:
                    for props in tree.proposals:
                        props[:] = [dataclasses.replace(p, kind=kind_override) for p in props]
                r = reqs[i]
                rows = torch.stack([table[tuple(r.output_ids) + tuple(tree.tokens[tree.path_to(u)[1:]].tolist())]
                                    for u in range(tree.n)])
                results.append(verify_stochastic(tree, rows, r.generator))
            for d in drafters:
                d.observe(batch, trees, results)
            for i, tree, res in zip(todo, trees, results):
                emitted = tree.tokens[res.path[1:]].tolist() + [res.bonus_token]
                reqs[i].output_ids += emitted
                if len(reqs[i].output_ids) >= 2:
                    first[i] = tuple(reqs[i].output_ids[:2])
            todo = [i for i in todo if i not in first]
        counts.update(first.values())
        for r in reqs:
            for d in drafters:
                d.release(r)
    return counts


def chi_squared_p_value(counts: Counter, table) -> float:
    """Goodness of fit against p(x1) p(x2 | x1); cells expecting < 5 are pooled."""
    total = sum(counts.values())
    cells = [(a, b) for a in range(CHI_VOCAB) for b in range(CHI_VOCAB)]
    expected = {c: total * float(table[()][c[0]] * table[(c[0],)][c[1]]) for c in cells}
    big = [c for c in cells if expected[c] >= 5]
    obs = [counts[c] for c in big] + [sum(counts[c] for c in cells if c not in big)]
    exp = [expected[c] for c in big] + [sum(expected[c] for c in cells if c not in big)]
    if exp[-1] < 5:
        obs[-2:], exp[-2:] = [obs[-2] + obs[-1]], [exp[-2] + exp[-1]]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


CHI_CASES = {"iid_static": (DraftSampling.IID, dict(num_speculative_tokens=2, expansion=[2, 1])),
             "swor_best_first": (DraftSampling.WITHOUT_REPLACEMENT, dict(num_speculative_tokens=2, branch=2)),
             "deterministic_static": (DraftSampling.DETERMINISTIC, dict(num_speculative_tokens=2, expansion=[2, 1]))}


def chi_setup():
    target, draft = chi_models()
    params = SamplingParams(temperature=1.0, max_tokens=8)
    return draft, params, path_table(target, CHI_PROMPT, 3, params)


@pytest.mark.parametrize("case", list(CHI_CASES))
def test_sampled_tokens_follow_the_target(case):
    """T = 1: the joint of the first two tokens with speculation matches plain sampling (20k samples)."""
    draft, params, table = chi_setup()
    sampling, cfg = CHI_CASES[case]
    counts = sample_first_two([drafter(draft, CHI_VOCAB, **cfg)], table, params, sampling, 20_000)
    assert sum(counts.values()) == 20_000
    assert chi_squared_p_value(counts, table) > 0.01


def test_chi_squared_check_catches_a_biased_rule():
    """The same pipeline with SWOR's q-update applied to i.i.d. draws (a known bias) fails the test."""
    draft, params, table = chi_setup()
    d = drafter(draft, CHI_VOCAB, num_speculative_tokens=2, expansion=[4, 1])
    counts = sample_first_two([d], table, params, DraftSampling.IID, 2_000, rounds=1,
                              kind_override=DraftKind.WITHOUT_REPLACEMENT)
    assert chi_squared_p_value(counts, table) < 1e-3
