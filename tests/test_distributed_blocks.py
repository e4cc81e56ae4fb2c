"""Tensor parallelism over a GGUF's quantized blocks (2 gloo processes, one thread each) against one process in
blocks mode on tiny GGUFs: every rank really computes from its slice of the blocks, logits agree to 1e-5 (the
all-reduce only reorders sums) and greedy tokens are equal, plainly and with n-gram speculation.

Cases: a Gemma 3 with one K/V head (copied to both ranks) and a Q8_0 tied head; a Llama whose F32 weights keep
some projections fp32 beside the blocks; a Gemma 3 whose o_proj split (16 columns) cuts its 32-weight groups, so
that projection runs fp32 from its dequantized blocks on each rank.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny_gguf import Dims, write_model
from tiny_hf import ancestor_mask, depths, prefill

from treespec import LLM, SamplingParams
from treespec.attention.metadata import single
from treespec.config import WeightQuantization
from treespec.kernels.q8_head import compiled as head_kernel
from treespec.models.quant_blocks import BlockQuantLinear

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(head_kernel() is None, reason="block kernels cannot be built here")]

# name -> (arch, dims, cycled quant types, o_proj cut inside a group)
CASES = {
    "gemma3-one-kv-head": ("gemma3", Dims(kv_heads=1), (Q.Q8_0, Q.Q5_0), False),
    "llama-mixed-f32": ("llama", Dims(), (Q.Q5_0, Q.F32, Q.Q8_0), False),
    "gemma3-cut-group": ("gemma3", Dims(heads=2, kv_heads=1), (Q.Q8_0, Q.Q5_0), True),
}
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, "num_speculative_tokens": 4,
         "budget": 6}
PROMPTS = ["hello world hello world hello", "the the the world", "abc abc abc ab", "x = (x)"]


@pytest.fixture(scope="module", params=list(CASES))
def llms(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(one process, TP=2), both with weight_quantization 'auto' on the same tiny GGUF, and the case."""
    arch, dims, qtypes, cut = CASES[request.param]
    path = tmp_path_factory.mktemp("tp_blocks") / f"{request.param}.gguf"
    write_model(path, arch, dims, qtypes=qtypes)
    one = LLM(str(path), speculative_config=NGRAM)
    split = LLM(str(path), speculative_config=NGRAM, tensor_parallel_size=2, num_threads=1)
    yield one, split, cut
    split.close()


def test_auto_computes_every_rank_from_its_blocks(llms) -> None:
    one, split, cut = llms
    assert one.config.weight_quantization is split.config.weight_quantization is WeightQuantization.BLOCKS
    layers = one.target.config.num_layers
    whole = sum(isinstance(m, BlockQuantLinear) for m in one.target.modules())
    assert whole > 0
    expected = f"{whole - layers * cut} of {4 * layers} projections from their blocks"
    assert split.target.rank_weights == [expected, expected]
    rank0 = sum(isinstance(m, BlockQuantLinear) for m in split.target.local.modules())
    assert rank0 == whole - layers * cut
    assert (split.target.lm_head.blocks_head is None) == (one.target.lm_head.blocks_head is None)


@torch.inference_mode()
def test_logits_match_one_process(llms) -> None:
    one, split, _ = llms
    vocab = one.target.config.vocab_size
    tokens = torch.tensor([(13 * i + 7) % vocab for i in range(20)])
    logits = []
    for model in (one.target, split.target):
        cache, h = prefill(model, tokens)
        parents = [-1, 0, 0, 1, 3]  # a tree after the prompt: pending rows see their ancestors only
        tree = torch.tensor([4, 8, 15, 16, 23]) % vocab
        cache.reserve(len(tree))
        pos = cache.length + torch.tensor(depths(parents))
        t = model(tree, pos, single(cache, len(tree), ancestor_mask(parents)))
        logits.append(model.logits(torch.cat([h, t])))
    err = float((logits[1] - logits[0]).abs().max()) / float(logits[0].abs().max())
    assert err < 1e-5, err


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "ngram"])
def test_greedy_tokens_equal_one_process(llms, speculate: bool) -> None:
    one, split, _ = llms
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    accepted = split.engine.stats.num_accepted_tokens
    for prompts in ([p] for p in PROMPTS):  # one at a time (1-row steps: the Q8_0 head's argmax), then together
        assert ([o.token_ids for o in split.generate(prompts, params, speculate=speculate)]
                == [o.token_ids for o in one.generate(prompts, params, speculate=speculate)])
    assert ([o.token_ids for o in split.generate(PROMPTS, params, speculate=speculate)]
            == [o.token_ids for o in one.generate(PROMPTS, params, speculate=speculate)])
    assert (split.engine.stats.num_accepted_tokens > accepted) == speculate  # speculation really ran (or not)
