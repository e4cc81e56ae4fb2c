"""Seeded sampling is reproducible whatever the batch and the drafts: with deterministic (n-gram) drafts the
token at output position k is drawn with noise fixed by (seed, k), so speculative seeded sampling emits
exactly plain seeded sampling's tokens, alone or batched. Temperature-only requests draw by Gumbel-max
(HeadPath.GUMBEL), top-p ones by inverse CDF over full distributions (HeadPath.FULL); both are covered. (The tiny
model is random: at T = 1 its drafts are almost never accepted, so T = 0.3 keeps acceptance testable.)"""
import pytest
from serving_tiny import run_to_end, tiny_engine, tiny_tokenizer

from treespec.sampling import SamplingParams

PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat sat on the"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("temperature, top_p", [(0.3, 1.0), (0.3, 0.9)], ids=["gumbel", "full"])
def test_speculative_seeded_sampling_equals_plain(tok, temperature, top_p):
    ids = tok.encode(PROMPT)
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=s, max_tokens=40, ignore_eos=True)
              for s in range(6)]
    plain = run_to_end(tiny_engine(tok), [ids] * 6, params, speculate=False)
    spec_engine = tiny_engine(tok, {"method": "ngram", "budget": 6})
    spec = run_to_end(spec_engine, [ids] * 6, params)
    assert spec == plain
    assert spec_engine.stats.num_accepted_tokens > 0  # speculation really happened
    assert len({tuple(o) for o in plain}) > 1          # and the seeds really differ


def test_seeded_request_is_the_same_alone_and_in_a_batch(tok):
    ids = tok.encode(PROMPT)
    p = SamplingParams(temperature=1.0, seed=11, max_tokens=30, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    alone = run_to_end(tiny_engine(tok, {"method": "ngram"}), [ids], [p])[0]
    batched = run_to_end(tiny_engine(tok, {"method": "ngram"}), [tok.encode("a server"), ids, ids], [other, p, other])[1]
    assert alone == batched
