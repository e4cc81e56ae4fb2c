"""A tiny random Llama + byte-level BPE tokenizer for the serving tests (built in well under a second)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from treespec.config import EngineConfig, SpecConfig
from treespec.drafters.registry import build_drafters
from treespec.engine.engine import LLMEngine
from treespec.models.registry import build_model
from treespec.tokenizer import Tokenizer

SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = ["the quick brown fox jumps over the lazy dog. ", "hello world, this is a tiny tokenizer for tests.",
          "speculative decoding verifies a tree of tokens in one forward pass.",
          "a server streams tokens to many clients at once and never mixes them up."]
MAX_LEN = 256


def tiny_backend() -> Backend:
    bk = Backend(models.BPE())
    bk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bk.train_from_iterator(CORPUS * 10, trainer)
    return bk


def tiny_tokenizer() -> Tokenizer:
    bk = tiny_backend()  # has <start_of_turn>, so it gets the Gemma chat template
    return Tokenizer(bk, bos_id=bk.token_to_id("<bos>"), eos_id=bk.token_to_id("<eos>"))


def tiny_hf_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    # a wide init keeps the top logits well apart, so greedy outputs do not hinge on rounding
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
                      tie_word_embeddings=False, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    return cfg, LlamaForCausalLM(cfg).eval()


def tiny_engine(tokenizer: Tokenizer, spec: dict | None = None, **config) -> LLMEngine:
    cfg, hf = tiny_hf_model(tokenizer.vocab_size)
    model = build_model(cfg.to_dict(), hf.state_dict())
    spec_cfg = SpecConfig.parse(spec)
    return LLMEngine(model, tokenizer, EngineConfig(model="tiny", **config), spec_cfg,
                     build_drafters(spec_cfg, model, tokenizer))


def run_to_end(engine: LLMEngine, prompts: list[list[int]], params_list, speculate: bool = True) -> list[list[int]]:
    """Add one request per (prompt, params), step until all finish; their output ids in order."""
    reqs = [engine.add_request(p, params, speculate=speculate) for p, params in zip(prompts, params_list)]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def save_tiny_model_dir(path: Path) -> Path:
    """config.json + model.safetensors + tokenizer files, loadable by `treespec serve --model PATH`."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    bk = tiny_backend()
    cfg, hf = tiny_hf_model(bk.get_vocab_size(with_added_tokens=True))
    cfg.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"))
    bk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return path
