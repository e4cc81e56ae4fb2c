"""Tiny random transformers models of every supported family, and treespec twins built from their weights.

transformers' own eager implementation is the oracle. Norm weights and biases are randomised (HF initialises
them to constants, which would hide a missing `1 + w` or a dropped bias) and a wide init keeps the top logits
apart, so greedy choices do not hinge on float rounding.
"""
from __future__ import annotations

import torch
import transformers as tf

from treespec.attention import AttentionBackend
from treespec.attention.metadata import single
from treespec.models import CausalLM, build_model

VOCAB = 97
WINDOW = 4  # sliding window of the tiny models: prompts are longer, so it matters
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3)
_SLIDE_FULL_SLIDE = ["sliding_attention", "full_attention", "sliding_attention"]


class StubTokenizer:
    """What the engine needs of a tokenizer when prompts are token ids."""
    eos_ids: set[int] = set()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))

    def id_to_token(self, token_id: int) -> str:
        return str(token_id)


def _configs() -> dict[str, tf.PretrainedConfig]:
    return {
        "llama": tf.LlamaConfig(**_COMMON, num_hidden_layers=2),
        "llama_bias_tied": tf.LlamaConfig(**_COMMON, num_hidden_layers=2, attention_bias=True, mlp_bias=True,
                                          tie_word_embeddings=True),
        "llama3_rope": tf.LlamaConfig(**_COMMON, num_hidden_layers=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "linear_rope": tf.LlamaConfig(**_COMMON, num_hidden_layers=2,
                                      rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}),
        "mistral": tf.MistralConfig(**_COMMON, num_hidden_layers=2, head_dim=16, sliding_window=WINDOW),
        "qwen2": tf.Qwen2Config(**_COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                max_window_layers=1),
        "qwen3": tf.Qwen3Config(**_COMMON, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True),
        "gemma3": tf.Gemma3TextConfig(**{**_COMMON, "num_key_value_heads": 1}, num_hidden_layers=3, head_dim=16,
                                      sliding_window=WINDOW, layer_types=_SLIDE_FULL_SLIDE, query_pre_attn_scalar=24,
                                      final_logit_softcapping=5.0, rope_parameters={
                                          "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    }


FAMILIES = list(_configs())
HF_CLASSES = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
               "qwen3": tf.Qwen3ForCausalLM, "gemma3_text": tf.Gemma3ForCausalLM}


def hf_model(name: str, seed: int = 0) -> tf.PreTrainedModel:
    cfg = _configs()[name]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = HF_CLASSES[cfg.model_type](cfg).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.uniform_(-0.5, 0.5) if cfg.model_type == "gemma3_text" else p.uniform_(0.5, 1.5)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.3)
    return hf


def twin(hf: tf.PreTrainedModel, attention: AttentionBackend | None = None) -> CausalLM:
    return build_model(hf.config.to_dict(), hf.state_dict(), attention)


def hf_logits(hf: tf.PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    """[T, V] logits of a plain forward over tokens: [T]."""
    with torch.no_grad():
        return hf(tokens[None]).logits[0]


def hf_greedy(hf: tf.PreTrainedModel, prompt: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens after prompt: [T], through transformers' own KV cache (what generate() does)."""
    out, tokens = [], prompt[None]
    cache = None
    with torch.no_grad():
        for _ in range(n):
            step = hf(tokens, cache=cache, use_cache=True)
            cache = step.cache
            out.append(int(step.logits[0, -1].argmax()))
            tokens = torch.tensor([[out[-1]]], device=prompt.device)
    return out


def prefill(model: CausalLM, tokens: torch.Tensor, max_len: int = 128):
    """Cache holding tokens: [T] and the hidden states [T, D] of the prefill."""
    cache = model.new_cache(max_len)
    cache.reserve(len(tokens))
    h = model(tokens, torch.arange(len(tokens)), single(cache, len(tokens)))
    cache.commit()
    return cache, h


def decode(model: CausalLM, cache, token: int) -> torch.Tensor:
    """One plain decode step; hidden state [1, D]."""
    cache.reserve(1)
    h = model(torch.tensor([token]), torch.tensor([cache.length]), single(cache, 1))
    cache.commit()
    return h


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: node i sees node j iff j is i or one of its ancestors (parents[root] = -1)."""
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i] = m[p]
        m[i, i] = True
    return m


def depths(parents: list[int]) -> list[int]:
    d: list[int] = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def branch(parents: list[int], i: int) -> list[int]:
    """Node indices from the root down to i."""
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def random_parents(n: int, gen: torch.Generator) -> list[int]:
    """A random tree in topological order: node 0 is the root, every other parent precedes its child."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
