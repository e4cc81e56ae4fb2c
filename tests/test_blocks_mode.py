"""weight_quantization 'blocks' end to end (LLM API on a tiny Gemma 3 GGUF: Q8_0 tied head, Q8_0 / Q5_0 body):
its greedy output equals the dequantized fp32 model's, speculation changes nothing (greedy and seeded sampling),
and a Hugging Face directory is refused with one clear line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from serving_tiny import save_tiny_model_dir

from tiny_gguf import write_model
from treespec import LLM, SamplingParams
from treespec.cli_args import build_parser
from treespec.config import DrafterConfig, WeightQuantization
from treespec.drafters.layer_skip import _nbytes
from treespec.errors import ConfigError
from treespec.kernels.q8_head import compiled as head_kernel
from treespec.models.quant_blocks import BlockQuantLinear

pytestmark = pytest.mark.skipif(head_kernel() is None, reason="block kernels cannot be built here")

NGRAM = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, "num_speculative_tokens": 4,
         "budget": 6}
PROMPTS = ["hello world hello world hello", "the the the world", "abc abc abc ab", "x = (x)"]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blocks_mode") / "gemma3.gguf"
    write_model(path, "gemma3", qtypes=(Q.Q8_0, Q.Q5_0))  # token_embd comes first: Q8_0
    return path


@pytest.fixture(scope="module")
def blocks_llm(gguf_path: Path) -> LLM:
    return LLM(str(gguf_path), speculative_config=NGRAM, weight_quantization="blocks")


def generate(llm: LLM, params: SamplingParams, speculate: bool) -> list[list[int]]:
    """One prompt at a time (1-row steps: the Q8_0 head's path), then all together (4+ rows: the screen's)."""
    alone = [llm.generate(p, params, speculate=speculate)[0].token_ids for p in PROMPTS]
    assert [o.token_ids for o in llm.generate(PROMPTS, params, speculate=speculate)] == alone
    return alone


def test_blocks_mode_computes_from_the_blocks(blocks_llm: LLM) -> None:
    target = blocks_llm.target
    swapped = [m for m in target.modules() if isinstance(m, BlockQuantLinear)]
    assert len(swapped) == 4 * target.config.num_layers
    assert blocks_llm.target.lm_head.blocks_head is not None


def test_greedy_equals_the_dequantized_fp32_model(blocks_llm: LLM, gguf_path: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    before = blocks_llm.target.lm_head.stats.blocks
    assert generate(blocks_llm, params, False) == generate(LLM(str(gguf_path)), params, False)
    assert blocks_llm.target.lm_head.stats.blocks > before  # the Q8_0 head decided rows


def test_speculative_greedy_equals_plain_greedy(blocks_llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = generate(blocks_llm, params, False)
    accepted = blocks_llm.engine.stats.num_accepted_tokens
    assert generate(blocks_llm, params, True) == plain
    assert blocks_llm.engine.stats.num_accepted_tokens > accepted  # speculation really happened


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["gumbel", "full"])
def test_speculative_seeded_sampling_equals_plain(blocks_llm: LLM, top_p: float) -> None:
    """T = 8: the tiny random model is so peaked that at T <= 1 every seed repeats one token."""
    outs = {}
    accepted = blocks_llm.engine.stats.num_accepted_tokens
    for speculate in (False, True):
        outs[speculate] = [blocks_llm.generate(p, SamplingParams(temperature=8.0, top_p=top_p, seed=s, max_tokens=32,
                                                                 ignore_eos=True), speculate=speculate)[0].token_ids
                           for s, p in enumerate(PROMPTS * 2)]
    assert outs[True] == outs[False]
    assert len({tuple(o) for o in outs[False]}) > 4  # the seeds really differ
    assert blocks_llm.engine.stats.num_accepted_tokens > accepted


def test_blocks_on_a_hugging_face_directory_is_refused(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(tmp_path / "hf")
    with pytest.raises(ConfigError, match="needs a GGUF model"):
        LLM(str(model_dir), weight_quantization="blocks")


def test_cli_and_config_take_the_blocks_choice() -> None:
    args = build_parser().parse_args(["bench", "--mode", "ar", "--weight-quantization", "blocks"])
    assert args.weight_quantization == "blocks"
    with pytest.raises(ConfigError, match="layer_skip draft"):
        DrafterConfig.from_dict({"method": "layer_skip", "quantization": "blocks"})


@torch.inference_mode()
def test_without_a_q8_0_head_the_body_still_runs_from_blocks(tmp_path: Path) -> None:
    path = tmp_path / "q5.gguf"
    write_model(path, "gemma3", qtypes=(Q.Q5_0, Q.Q8_0))  # token_embd Q5_0: no head kernel for it
    llm = LLM(str(path), weight_quantization="blocks")
    assert llm.target.lm_head.blocks_head is None
    assert any(isinstance(m, BlockQuantLinear) for m in llm.target.modules())
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert generate(llm, params, False) == generate(LLM(str(path)), params, False)


def test_auto_is_the_default_blocks_for_a_gguf_fp32_for_hugging_face(blocks_llm: LLM, gguf_path: Path,
                                                                        tmp_path: Path) -> None:
    gguf_llm = LLM(str(gguf_path))
    assert gguf_llm.config.weight_quantization is WeightQuantization.BLOCKS
    assert any(isinstance(m, BlockQuantLinear) for m in gguf_llm.target.modules())
    hf_llm = LLM(str(save_tiny_model_dir(tmp_path / "hf")))
    assert hf_llm.config.weight_quantization is WeightQuantization.NONE
    assert not any(isinstance(m, BlockQuantLinear) for m in hf_llm.target.modules())
    assert build_parser().parse_args(["generate", "hi"]).weight_quantization == "auto"
    with pytest.raises(ConfigError, match="layer_skip draft"):
        DrafterConfig.from_dict({"method": "layer_skip", "quantization": "auto"})


def test_a_self_draft_over_block_layers_counts_their_bytes(blocks_llm: LLM) -> None:
    """LayerSkipView.cost (the bandit's price of a draft forward) sees the codes and scales held as buffers."""
    layer = blocks_llm.target.layers[0]
    block_bytes = sum(m.blocks.nbytes for m in layer.modules() if isinstance(m, BlockQuantLinear))
    assert block_bytes > 0
    assert _nbytes(layer) >= block_bytes
