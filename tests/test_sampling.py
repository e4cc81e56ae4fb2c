"""Sampling: logits processing against HF transformers' warpers/processors and naive twins; parameter checks."""
import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import treespec.sampling as sampling
from treespec.errors import ConfigError
from treespec.sampling import SamplingParams, apply_penalties, logits_to_probs, make_generator, sample


def rand_logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed))


def hf_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """HF's warpers in HF's order (temperature, top-k, top-p, min-p), then softmax."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return torch.softmax(scores, dim=-1)


def naive_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Slow twin: full sort, keep a token iff the mass ranked strictly above it is below top_p."""
    out = torch.full_like(logits, -math.inf)
    for r, row in enumerate(logits):
        probs = torch.softmax(row, 0)
        order = torch.argsort(probs, descending=True).tolist()
        mass = 0.0
        for tok in order:
            if mass >= top_p:
                break
            out[r, tok] = row[tok]
            mass += float(probs[tok])
    return out


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(top_p=0.8),
                                dict(temperature=0.5, top_p=0.9, top_k=20), dict(min_p=0.05),
                                dict(temperature=2.0, top_k=30, top_p=0.95, min_p=0.02)])
def test_logits_to_probs_matches_hf_warpers(kw):
    logits = rand_logits(6, 200, seed=len(kw))
    ours = logits_to_probs(logits, SamplingParams(**kw))
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, hf_probs(logits, **kw), atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones(6))


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_matches_full_sort_twin_beyond_first_window(top_p, monkeypatch):
    monkeypatch.setattr(sampling, "_TOP_P_FIRST_K", 8)  # force the doubling search past the first window
    logits = rand_logits(4, 300, seed=1, scale=0.5)
    ours = sampling.top_p_mask(logits, top_p)
    assert torch.equal(ours.isinf(), naive_top_p(logits, top_p).isinf())
    kept = (~ours.isinf()).sum(-1)
    assert bool((kept >= 1).all()) and (top_p < 0.5 or bool((kept > 8).any()))


def test_top_k_and_min_p_against_naive():
    logits = rand_logits(3, 50, seed=2)
    probs = logits_to_probs(logits, SamplingParams(top_k=7))
    for r in range(3):
        assert set(probs[r].nonzero().flatten().tolist()) == set(torch.topk(logits[r], 7).indices.tolist())
    probs = logits_to_probs(logits, SamplingParams(min_p=0.1))
    full = torch.softmax(logits, -1)
    keep = full >= 0.1 * full.max(-1, keepdim=True).values
    assert torch.equal(probs > 0, keep)
    assert torch.allclose(probs, torch.where(keep, full, 0) / torch.where(keep, full, 0).sum(-1, keepdim=True))


def test_temperature_and_greedy():
    logits = rand_logits(3, 20, seed=3)
    assert torch.allclose(logits_to_probs(logits, SamplingParams(temperature=0.5)), torch.softmax(logits / 0.5, -1))
    greedy = logits_to_probs(logits, SamplingParams(temperature=0.0))
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(3))
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams(temperature=0.1).greedy
    assert torch.equal(logits_to_probs(logits, SamplingParams(top_k=-1)), logits_to_probs(logits, SamplingParams()))


# ---- penalties --------------------------------------------------------------------------------------------
def test_repetition_penalty_matches_hf_per_row():
    logits = rand_logits(3, 30, seed=4)
    prompt = [1, 2, 2, 7]
    outputs = [[], [3, 7, 3], [29, 0]]
    ours = apply_penalties(logits, SamplingParams(repetition_penalty=1.3), prompt, outputs)
    for r in range(3):
        ids = torch.tensor([prompt + outputs[r]])
        expect = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[r:r + 1].clone())[0]
        assert torch.allclose(ours[r], expect)


def naive_presence_frequency(logits, outputs, presence, frequency):
    out = logits.clone()
    for r, toks in enumerate(outputs):
        for tok in set(toks):
            out[r, tok] -= frequency * toks.count(tok) + presence
    return out


def test_presence_and_frequency_penalties_follow_openai_over_output_only():
    logits = rand_logits(3, 30, seed=5)
    prompt = [4, 4, 5]
    outputs = [[4, 6, 6, 6], [], [9]]
    ours = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt, outputs)
    assert torch.allclose(ours, naive_presence_frequency(logits, outputs, 0.5, 0.25))
    assert ours[1, 4] == logits[1, 4]  # the prompt does not count


def test_all_penalties_together_repetition_first():
    logits = rand_logits(2, 30, seed=6)
    params = SamplingParams(repetition_penalty=0.8, presence_penalty=-0.3, frequency_penalty=0.6)
    prompt, outputs = [1, 3], [[3, 3, 8], [1]]
    ids = [torch.tensor([prompt + o]) for o in outputs]
    rep = torch.cat([RepetitionPenaltyLogitsProcessor(0.8)(i, logits[r:r + 1].clone()) for r, i in enumerate(ids)])
    expect = naive_presence_frequency(rep, outputs, -0.3, 0.6)
    assert torch.allclose(apply_penalties(logits, params, prompt, outputs), expect)


def test_neutral_penalties_leave_logits_alone():
    logits = rand_logits(2, 10, seed=7)
    assert apply_penalties(logits, SamplingParams(), [1, 2], [[3], []]) is logits
    before = logits.clone()
    apply_penalties(logits, SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), [1], [[2], [2]])
    assert torch.equal(logits, before)  # the caller's tensor is not modified


# ---- sampling ---------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible():
    probs = torch.softmax(rand_logits(50, 1000, seed=8, scale=0.1), -1)
    a, b = sample(probs, make_generator(7)), sample(probs, make_generator(7))
    assert a.dtype == torch.long and a.shape == (50,) and torch.equal(a, b)
    assert not torch.equal(a, sample(probs, make_generator(8)))


def test_sample_follows_probabilities():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    counts = torch.bincount(sample(probs, make_generator(0)), minlength=4).double() / 20000
    assert counts[1] == 0 and torch.allclose(counts, probs[0].double(), atol=0.015)


# ---- parameter validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("n", 0), ("n", 1.5), ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 2.0), ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0), ("seed", -1), ("seed", "7"), ("max_tokens", 0), ("max_tokens", True),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("stop_token_ids", 5), ("stop_token_ids", "ab"),
    ("ignore_eos", 1), ("logprobs", -1),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        SamplingParams(**{field: value})


def test_valid_params_are_normalized():
    params = SamplingParams(stop="###", stop_token_ids=(3, 4), top_k=-1, temperature=0, seed=0, logprobs=0)
    assert params.stop == ["###"] and params.stop_token_ids == [3, 4] and params.greedy
