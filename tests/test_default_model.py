"""The real default model (Gemma 3 270M, GGUF Q4_K_M) against HF transformers on the same file.

The reference is transformers end to end: its GGUF reader dequantizes the file and its Gemma3ForCausalLM runs
greedy generation in fp32. treespec must produce the same tokens, with and without speculation.
"""
from __future__ import annotations

import pytest
import torch

from treespec.api import LLM
from treespec.drafters.registry import SHIPPED_DIR
from treespec.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Translate to German: Good morning, how are you today?",
]
NEW_TOKENS = 32
SHIPPED = SHIPPED_DIR / "gemma-3-270m"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("gemma-3-270m", speculative_config={"method": "ngram", "budget": 8})


@pytest.fixture(scope="module")
def hf_greedy(llm: LLM) -> list[list[int]]:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llm.model_config), dtype=torch.float32)
    state = load_gguf_checkpoint(str(llm.checkpoint_source), return_tensors=True, model_to_load=model)["tensors"]
    missing, _ = model.load_state_dict({k: torch.as_tensor(v).float() for k, v in state.items()}, strict=False)
    assert not [m for m in missing if m != "lm_head.weight"], missing
    model.tie_weights()
    model.eval()
    outs = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = torch.tensor([llm.tokenizer.encode(p)])
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def _run(llm: LLM, speculate: bool, engine=None) -> list[list[int]]:
    engine = engine or llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    reqs = [engine.add_request(llm.tokenizer.encode(p), params, speculate=speculate) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def test_plain_greedy_equals_transformers(llm: LLM, hf_greedy: list[list[int]]) -> None:
    assert _run(llm, speculate=False) == hf_greedy


def test_speculative_greedy_equals_transformers(llm: LLM, hf_greedy: list[list[int]]) -> None:
    assert _run(llm, speculate=True) == hf_greedy


def test_ngram_speculation_accepts_on_a_repetitive_prompt(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    req = llm.engine.add_request(llm.tokenizer.encode(PROMPTS[2]), params)
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert req.metrics.num_accepted_tokens > 0 and req.metrics.num_steps < NEW_TOKENS


HEAD = {"method": "learned", "model": str(SHIPPED)}


@pytest.mark.parametrize("spec", [HEAD, {"drafters": [HEAD, {"method": "ngram"}]},
                                  {"method": "layer_skip", "draft_vocab_size": 32768}],
                         ids=["shipped_head", "shipped_head_and_ngram", "layer_skip"])
def test_other_drafters_greedy_equal_transformers(llm: LLM, hf_greedy: list[list[int]], spec: dict) -> None:
    """The head shipped for this model (alone, merged with n-gram) and self-speculation change nothing; the head
    gets drafts accepted."""
    engine = llm.make_engine(spec)
    assert _run(llm, speculate=True, engine=engine) == hf_greedy
    if spec is HEAD:
        assert engine.stats.num_accepted_tokens > 0


def _run_sampled(llm: LLM, speculate: bool, seeds: range) -> list[list[int]]:
    reqs = [llm.engine.add_request(llm.tokenizer.encode(p), SamplingParams(temperature=1.0, seed=s,
                                                                           max_tokens=NEW_TOKENS, ignore_eos=True),
                                   speculate=speculate) for p in PROMPTS for s in seeds]
    while llm.engine.has_unfinished():
        llm.engine.step()
    return [r.output_ids for r in reqs]


def test_seeded_sampling_through_the_screen_is_the_same_with_ngram_speculation(llm: LLM) -> None:
    """T = 1 draws are Gumbel-max through the fp16 screen (models/head_sampler.py); with n-gram drafts the same
    (seed, position) noise gives the same tokens as plain sampling, and the screen decides the draws."""
    stats = llm.target.lm_head.stats
    before = stats.screened
    plain = _run_sampled(llm, speculate=False, seeds=range(2))
    spec = _run_sampled(llm, speculate=True, seeds=range(2))
    assert spec == plain
    assert stats.screened - before >= 2 * len(PROMPTS) * NEW_TOKENS


@torch.inference_mode()
def test_screened_draws_equal_brute_force_on_real_hidden_states(llm: LLM) -> None:
    from treespec.attention.metadata import single
    from treespec.models.head_sampler import exact_logits, gumbel_sample
    from treespec.noise import gumbel
    model, head = llm.target, llm.target.lm_head
    ids = torch.tensor(llm.tokenizer.encode(PROMPTS[1] + PROMPTS[3]))
    cache = model.new_cache(len(ids))
    cache.reserve(len(ids))
    hidden = model(ids, torch.arange(len(ids)), single(cache, len(ids)))
    g = torch.Generator().manual_seed(0)
    for h in hidden[-12:]:
        u = torch.rand(head.vocab_size, generator=g, dtype=torch.float64)
        x = exact_logits(head, h)
        for t in (1.0, 0.5):
            assert gumbel_sample(head, h, u, t, head.screen_logits(h[None])[0]) == int((x / t + gumbel(u)).argmax())
