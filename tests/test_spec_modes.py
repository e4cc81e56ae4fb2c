"""Every weight mode stays lossless under speculation: speculative greedy == plain greedy of that same mode.

Speculation verifies a tree's rows in one forward; a mode whose numbers for one row depend on the other rows of
the forward (int8 with one activation scale per call did) makes speculative output drift from plain output.
Tiny Gemma 3 GGUF (Q8_0 and Q5_0 weights) as the target in fp32, fp16, int8 and from its blocks (Q8_0 head
too); a perturbed copy drafts (partly accepted, partly rejected) next to an n-gram drafter.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_drafter_model import StubTokenizer, perturbed

from tiny_gguf import write_model
from treespec.config import DrafterMethod, EngineConfig, SpecConfig, WeightQuantization
from treespec.drafters.model import ModelDrafter
from treespec.drafters.ngram import NgramDrafter
from treespec.engine.engine import LLMEngine
from treespec.kernels.block_mm import compiled
from treespec.models import build_model
from treespec.models.lm_head import fp16_ops_available
from treespec.models.quant import quantize_linears
from treespec.models.quant_blocks import use_blocks, use_head_blocks
from treespec.sampling import SamplingParams
from treespec.weights.gguf_blocks import load_gguf_blocks, load_head_blocks
from treespec.weights.gguf_file import read_gguf
from treespec.weights.loader import load_checkpoint

MAX_TOKENS = 64
NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, "num_speculative_tokens": 4}
TREE = {"method": "draft_model", "model": "draft", "num_speculative_tokens": 4, "expansion": [1, 2, 3, 1]}
MODES = ("fp32", "fp16", "int8", "blocks")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spec_modes") / "gemma3.gguf"
    write_model(path, "gemma3", qtypes=(Q.Q8_0, Q.Q5_0))
    return path


def target_in(mode: str, path: Path) -> torch.nn.Module:
    ckpt = load_checkpoint(str(path))
    model = build_model(ckpt.config, ckpt.tensors)
    if mode in ("fp16", "int8"):
        if not fp16_ops_available():
            pytest.skip("fbgemm ops not in this torch build")
        assert quantize_linears(model, WeightQuantization(mode)) > 0
    if mode == "blocks":
        if compiled() is None:
            pytest.skip("block kernel cannot be built here")
        gguf = read_gguf(path)
        assert use_blocks(model, load_gguf_blocks(gguf, ckpt.config)) > 0
        assert use_head_blocks(model, load_head_blocks(gguf))
    return model


def generate(target: torch.nn.Module, draft: torch.nn.Module, vocab: int, spec_dict: dict | None,
             prompts: list[list[int]]) -> list[list[int]]:
    spec = SpecConfig.parse(spec_dict)
    drafters = [NgramDrafter(c, i) if c.method is DrafterMethod.NGRAM else ModelDrafter(c, i, draft, vocab)
                for i, c in enumerate(spec.drafters)]
    engine = LLMEngine(target, StubTokenizer(), EngineConfig(model="tiny", max_num_batched_tokens=64), spec,
                       drafters)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    accepted = sum(r.metrics.num_accepted_tokens for r in reqs)
    drafted = sum(r.metrics.num_draft_tokens for r in reqs)
    assert spec_dict is None or 0 < accepted < drafted  # trees were both accepted and rejected
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("mode", MODES)
@torch.inference_mode()
def test_speculative_greedy_equals_plain_greedy_in_every_weight_mode(mode: str, gguf_path: Path) -> None:
    target = target_in(mode, gguf_path)
    ckpt = load_checkpoint(str(gguf_path))
    vocab = ckpt.config["vocab_size"]
    draft = perturbed({"config": ckpt.config, "tensors": ckpt.tensors}, 0.3, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, vocab, (n,), generator=g).tolist() for n in (9, 30, 5, 17, 40, 2)]
    prompts.append([300, 301, 302] * 5)
    plain = generate(target, draft, vocab, None, prompts)
    assert all(len(p) == MAX_TOKENS for p in plain)
    assert generate(target, draft, vocab, {"drafters": [NGRAM, TREE]}, prompts) == plain
