"""Coupled drafting: a draft picks its children by Gumbel-max under the very noise the target draws each output
position with (treespec.noise.PositionNoise), so a draft close to the target proposes the target's own next token.

Oracles: seeded speculative sampling with coupled drafts emits exactly plain seeded sampling's tokens (the output
is a function of the seed alone, whatever the draft); a draft that *is* the target (every layer, fp32, full
vocabulary) has its coupled drafts accepted (one-hot top-1 drafts of the same draft mostly are not at T = 1), and
the drafter's running acceptance rate learns it; requests with top-p or penalties fall back to one-hot drafts.
"""
import pytest
import torch
from serving_tiny import run_to_end, tiny_engine, tiny_tokenizer

from treespec.models import truncated_head
from treespec.models.truncated_head import noise_tail
from treespec.engine.request import Request
from treespec.sampling import SamplingParams

PROMPT = "the cat sat on the mat. a dog ran in the park. the cat sat on the"
ALL_LAYERS = [0, 1]  # the tiny target's two layers


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _self_draft(quantization: str, vocab: int | None = None, sampling: str = "coupled") -> dict:
    return {"method": "layer_skip", "layers": ALL_LAYERS, "quantization": quantization, "draft_vocab_size": vocab,
            "num_speculative_tokens": 4, "branch": 2, "draft_sampling": sampling, "budget": 6}


@pytest.mark.parametrize("spec", [_self_draft("none"), _self_draft("fp16", vocab=40),
                                  {"method": "layer_skip", "layers": [0], "draft_sampling": "coupled", "budget": 6}],
                         ids=["self_fp32", "self_fp16_truncated", "skip_layer"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)], ids=["gumbel", "top_p"])
def test_coupled_seeded_sampling_equals_plain(tok, spec, temperature, top_p):
    ids = tok.encode(PROMPT)
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=s, max_tokens=24, ignore_eos=True)
              for s in range(4)]
    plain = run_to_end(tiny_engine(tok), [ids] * 4, params, speculate=False)
    engine = tiny_engine(tok, spec)
    assert run_to_end(engine, [ids] * 4, params) == plain
    assert engine.stats.num_draft_tokens > 0
    assert len({tuple(o) for o in plain}) > 1


def _acceptance(tok, sampling: str) -> tuple[float, object]:
    engine = tiny_engine(tok, _self_draft("none", sampling=sampling))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True) for s in range(4)]
    run_to_end(engine, [tok.encode(PROMPT)] * 4, params)
    s = engine.stats
    return s.num_accepted_tokens / max(1, s.num_steps), engine.speculator.drafters[0].arms[0]


def test_a_coupled_draft_of_the_target_is_the_target(tok):
    """Draft == target: every coupled chain is accepted down to its depth (one-hot top-k: far fewer)."""
    coupled, arm = _acceptance(tok, "coupled")
    one_hot, _ = _acceptance(tok, "deterministic")
    assert coupled > 2.5 and coupled > 2 * one_hot
    assert arm.coupled_rate > 0.9


def test_position_noise_is_kept_until_its_position_is_emitted():
    r = Request("a", [1, 2, 3], SamplingParams(temperature=1.0, seed=5))
    u = r.position_noise(50).gumbel_uniforms(2)
    assert r.position_noise(50).gumbel_uniforms(2) is u
    r.output_ids += [7, 8, 9]
    again = r.position_noise(50).gumbel_uniforms(0)  # position 2 is emitted now: its row is dropped
    assert 2 not in r.noise.rows and 3 in r.noise.rows
    fresh = Request("b", [1], SamplingParams(temperature=1.0, seed=5)).position_noise(50)
    assert torch.equal(fresh.gumbel_uniforms(3), again) and torch.equal(fresh.gumbel_uniforms(2), u)


def test_noise_tail_is_the_high_noise_ids_outside_the_subset():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(5000, generator=g, dtype=torch.float64)
    in_subset = torch.zeros(5000, dtype=torch.bool)
    in_subset[torch.randperm(5000, generator=g)[:1000]] = True
    ids = noise_tail(u, in_subset, expected=200)
    want = [v for v in range(5000) if u[v] > 1 - 200 / 5000 and not in_subset[v]]
    assert ids.tolist() == want and 120 < len(want) < 200


def _truncated_acceptance(tok, monkeypatch, tail: int) -> float:
    monkeypatch.setattr(truncated_head, "NOISE_TAIL", tail)
    engine = tiny_engine(tok, _self_draft("none", vocab=4))
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True) for s in range(4)]
    run_to_end(engine, [tok.encode(PROMPT)] * 4, params)
    return engine.stats.num_accepted_tokens / max(1, engine.stats.num_steps)


def test_the_noise_tail_lets_a_truncated_draft_propose_outside_its_vocabulary(tok, monkeypatch):
    """Draft == target over a 4-token draft vocabulary: with a noise tail covering the rest of the tiny vocabulary
    its coupled chains are the target's draws again; without one, most draws fall outside the 4 tokens."""
    with_tail = _truncated_acceptance(tok, monkeypatch, 1 << 20)
    without = _truncated_acceptance(tok, monkeypatch, 0)
    assert with_tail > 2.5 and with_tail > 1.5 * without


def test_drafters_routed_by_request_kind_keep_both_outputs_exact(tok):
    """n-gram for greedy requests, the coupled self-draft for sampling ones, in one batch: each drafter sees only its
    requests and both kinds emit exactly their plain outputs."""
    spec = {"drafters": [{"method": "ngram", "requests": "greedy"},
                         dict(_self_draft("none"), requests="sampling")], "draft_sampling": "coupled", "budget": 6}
    spec["drafters"][1].pop("draft_sampling")
    spec["drafters"][1].pop("budget")
    ids = tok.encode(PROMPT)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)]
    plain = run_to_end(tiny_engine(tok), [ids] * 2, params, speculate=False)
    engine = tiny_engine(tok, spec)
    ngram, self_draft = engine.speculator.drafters
    seen = {d.drafter_id: set() for d in engine.speculator.drafters}
    for d in engine.speculator.drafters:
        propose = d.propose
        d.propose = lambda batch, d=d, propose=propose: (
            seen[d.drafter_id].update(b.request.params.greedy for b in batch), propose(batch))[1]
    assert run_to_end(engine, [ids] * 2, params) == plain
    assert seen == {ngram.drafter_id: {True}, self_draft.drafter_id: {False}}
    assert engine.stats.num_accepted_tokens > 0
