"""Tensor and pipeline parallelism on gloo (2 processes, one thread each) against one process, on the tiny models of
every family: the same logits (to 1e-5) and the same tokens, greedy with and without speculation and seeded sampling.

The single-process model is the oracle: a split model only reorders floating-point sums (each all-reduce adds
partial products), so logits agree to rounding and the wide tiny models keep greedy choices clear of it.
"""
from __future__ import annotations

import pytest
import torch
from test_drafter_model import StubTokenizer, perturbed
from tiny_hf import VOCAB, ancestor_mask, depths, hf_model, prefill

from treespec.attention.metadata import single
from treespec.config import DrafterMethod, EngineConfig, SpecConfig
from treespec.distributed.launch import start_parallel
from treespec.distributed.source import TensorsSource
from treespec.drafters.model import ModelDrafter
from treespec.drafters.ngram import NgramDrafter
from treespec.engine.engine import LLMEngine
from treespec.models.registry import build_model
from treespec.sampling import SamplingParams

pytestmark = pytest.mark.distributed

# one tiny config per family; llama_bias_tied has o/down biases (added once across the ranks), gemma3 one K/V head
# (copied to both ranks), qwen2 q/k/v biases and a sliding layer
FAMILIES = ["llama_bias_tied", "mistral", "qwen2", "qwen3", "gemma3"]
MODES = {"tp": {"tensor_parallel_size": 2}, "pp": {"pipeline_parallel_size": 2}}
PROMPTS = [[3, 9, 27, 17, 51, 25, 11], [5, 6, 7, 8] * 6, [(13 * i + 7) % VOCAB for i in range(40)], [42]]
MAX_TOKENS = 24
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, "num_speculative_tokens": 4,
         "budget": 8}
DRAFT = {"method": "draft_model", "model": "draft", "num_speculative_tokens": 4, "branch": 2, "budget": 8}


@pytest.fixture(scope="module", params=[(f, m) for m in MODES for f in FAMILIES], ids=lambda p: f"{p[1]}-{p[0]}")
def models(request):
    """(one-process target, the same target split over 2 ranks, a draft model) of one family and mode."""
    family, mode = request.param
    hf = hf_model(family)
    spec = {"config": hf.config.to_dict(), "tensors": hf.state_dict()}
    config = EngineConfig(model="tiny", **MODES[mode])
    split = start_parallel(TensorsSource(spec["config"], spec["tensors"]), config,
                           build_model(spec["config"], spec["tensors"]))
    yield build_model(spec["config"], spec["tensors"]), split, perturbed(spec, 0.1, seed=1)
    split.shutdown()


def generate(target, draft, spec_dict: dict | None, params: list[SamplingParams]) -> list[list[int]]:
    spec = SpecConfig.parse(spec_dict)
    drafters = [NgramDrafter(c, i) if c.method is DrafterMethod.NGRAM else ModelDrafter(c, i, draft, VOCAB)
                for i, c in enumerate(spec.drafters)]
    engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny", max_num_batched_tokens=32), spec, drafters)
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    while engine.has_unfinished():
        engine.step()
    assert all(r.finish_reason.value == "length" for r in reqs)
    return [r.output_ids for r in reqs]


@torch.inference_mode()
def test_logits_match_one_process(models):
    one, split, _ = models
    tokens = torch.tensor(PROMPTS[2][:20])
    logits = []
    for model in (one, split):
        cache, h = prefill(model, tokens)
        parents = [-1, 0, 0, 1, 3]  # a tree after the prompt: pending rows see their ancestors only
        tree = torch.tensor([4, 8, 15, 16, 23])
        cache.reserve(len(tree))
        pos = cache.length + torch.tensor(depths(parents))
        t = model(tree, pos, single(cache, len(tree), ancestor_mask(parents)))
        logits.append(model.logits(torch.cat([h, t])))
    scale = float(logits[0].abs().max())  # the wide tiny models' logits reach ~10: compare relative to that
    err = float((logits[1] - logits[0]).abs().max()) / scale
    assert err < 1e-5, err  # measured: TP 5e-7..2.1e-6; PP 0 (whole layers: the same sums in the same order)


@pytest.mark.parametrize("spec", [None, NGRAM, DRAFT], ids=["plain", "ngram", "draft_model"])
def test_greedy_tokens_equal_one_process(models, spec):
    one, split, draft = models
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)] * len(PROMPTS)
    assert generate(split, draft, spec, params) == generate(one, draft, spec, params)


def test_seeded_sampling_equal_one_process(models):
    one, split, draft = models  # temperature-only with n-gram (one-hot) drafts: the Gumbel-max walk
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS, ignore_eos=True) for s in range(4)]
    assert generate(split, draft, NGRAM, params) == generate(one, draft, NGRAM, params)
