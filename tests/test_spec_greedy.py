"""Speculative greedy decoding is plain greedy decoding, token for token, for every drafter and tree shape.

Tiny random Llama target; the SSMs are different models (the target's weights plus noise), so drafts are
partly accepted and partly rejected. Requests run together with a small token budget, so prefill chunks,
tree verification and drafting interleave across requests. With draft = target every greedy draft is accepted.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_drafter_model import StubTokenizer, build, perturbed, tiny_llama

from treespec.config import DrafterMethod, EngineConfig, SpecConfig
from treespec.drafters.model import ModelDrafter
from treespec.drafters.ngram import NgramDrafter
from treespec.engine.engine import LLMEngine
from treespec.models.layers import pack_linears
from treespec.sampling import SamplingParams

VOCAB = 64
MAX_TOKENS = 40
PROMPTS = [[3, 9, 27, 17, 51, 25, 11], [5, 6, 7, 8] * 6, [(13 * i + 7) % VOCAB for i in range(90)], [42]]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    spec = tiny_llama(VOCAB, seed=0)
    return {"target": build(spec), "draft_a": perturbed(spec, 0.1, seed=1), "draft_b": perturbed(spec, 0.25, seed=2)}


def make_drafters(spec: SpecConfig, models: dict[str, torch.nn.Module]):
    return [NgramDrafter(c, i) if c.method is DrafterMethod.NGRAM else ModelDrafter(c, i, models[c.model], VOCAB)
            for i, c in enumerate(spec.drafters)]


def generate(models, spec_dict: dict | None, max_tokens: int = MAX_TOKENS, prompts=PROMPTS):
    spec = SpecConfig.parse(spec_dict)
    engine = LLMEngine(models["target"], StubTokenizer(), EngineConfig(model="tiny", max_num_batched_tokens=64),
                       spec, make_drafters(spec, models))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return reqs


NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, "num_speculative_tokens": 4}
CHAIN = {"method": "draft_model", "model": "draft_a", "num_speculative_tokens": 4, "branch": 1}
STATIC = {"method": "draft_model", "model": "draft_a", "num_speculative_tokens": 4, "expansion": [1, 1, 3, 1]}
BEST_FIRST = {"method": "draft_model", "model": "draft_b", "num_speculative_tokens": 5, "branch": 3}
SPECS = {
    "ngram": NGRAM,
    "model_chain": CHAIN,
    "model_static": STATIC,
    "model_best_first": BEST_FIRST,
    "model_best_first_budget_5": {**BEST_FIRST, "budget": 5},
    "two_ssms": {"drafters": [CHAIN, BEST_FIRST]},
    "ngram_and_ssm": {"drafters": [NGRAM, STATIC]},
}


@pytest.fixture(scope="module")
def plain(models):
    return [r.output_ids for r in generate(models, None)]


@pytest.mark.parametrize("name", list(SPECS))
def test_speculative_greedy_equals_plain_greedy(models, plain, name):
    reqs = generate(models, SPECS[name])
    assert [r.output_ids for r in reqs] == plain
    assert all(len(r.output_ids) == MAX_TOKENS for r in reqs)
    accepted = sum(r.metrics.num_accepted_tokens for r in reqs)
    drafted = sum(r.metrics.num_draft_tokens for r in reqs)
    assert 0 < accepted < drafted  # drafts were both accepted and rejected: both paths ran
    if "budget" in SPECS[name]:
        assert all(r.metrics.num_draft_tokens <= 5 * r.metrics.num_steps for r in reqs)


def test_packed_target_speculative_greedy_equals_plain_greedy(models, plain):
    """The same with every projection of the target through oneDNN (trees of 3+ rows take it, single rows not)."""
    spec = tiny_llama(VOCAB, seed=0)
    target = build(spec)
    assert pack_linears(target, min_numel=0) > 0
    packed = {**models, "target": target}
    assert [r.output_ids for r in generate(packed, None)] == plain
    assert [r.output_ids for r in generate(packed, SPECS["ngram_and_ssm"])] == plain


@pytest.mark.parametrize("shape", [{"branch": 1}, {"expansion": [1, 1, 3, 1]}], ids=["chain", "static"])
def test_draft_equal_to_target_accepts_every_greedy_draft(models, shape):
    """Each step emits depth + 1 tokens; only the last step is shallower (it is cut by max_tokens)."""
    max_tokens, depth = 42, 4
    models = {**models, "same": models["target"]}
    spec = {"method": "draft_model", "model": "same", "num_speculative_tokens": depth, **shape}
    reqs = generate(models, spec, max_tokens=max_tokens, prompts=PROMPTS[:2])
    plain = generate(models, None, max_tokens=max_tokens, prompts=PROMPTS[:2])
    for r, p in zip(reqs, plain):
        assert r.output_ids == p.output_ids
        m = r.metrics
        assert m.num_steps == math.ceil(max_tokens / (depth + 1))
        assert m.num_accepted_tokens == max_tokens - m.num_steps
        assert m.accepted_per_position == [m.num_steps] + [m.num_steps - 1] * (depth - 1)
