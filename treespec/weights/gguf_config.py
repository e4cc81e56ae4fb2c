"""An HF `config.json`-style dict from GGUF metadata, with family defaults for what llama.cpp leaves out.

llama.cpp's Gemma 3 files omit the local (sliding-layer) RoPE base, the sliding/full layer pattern and
`query_pre_attn_scalar`; transformers' `Gemma3TextConfig` defaults are the values every Gemma 3 size uses
(10,000; five sliding layers then one full; head_dim), except 27B, whose scalar is hidden/heads = 168.
Llama 3.x files store their RoPE scaling only as a precomputed per-frequency factor tensor (`rope_freqs`);
we recover HF's `llama3` parameters from it and check that they reproduce it exactly.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from treespec.errors import ModelLoadError
from treespec.weights.gguf_names import GGUFArch

_GEMMA3_LOCAL_ROPE_BASE = 10_000.0
_GEMMA3_SLIDING_PATTERN = 6  # layers i with (i + 1) % 6 != 0 slide
_GEMMA3_QUERY_SCALAR_BY_HIDDEN = {5376: 168.0}  # 27B; every other size uses head_dim
_LLAMA3_ROPE_GUESS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config(meta: dict[str, Any], arch: GGUFArch, vocab_size: int, tied: bool,
              rope_freqs: np.ndarray | None) -> dict[str, Any]:
    """The config dict for `arch` (HF key names); rope_freqs: [head_dim / 2] factors or None."""
    key = _Keys(meta, arch.value)
    hidden, heads = int(key.need("embedding_length")), int(key.need("attention.head_count"))
    head_dim = int(key.get("attention.key_length", hidden // heads))
    kv_heads = key.get("attention.head_count_kv", heads)
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(key.need("feed_forward_length")),
        "num_hidden_layers": int(key.need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(np.max(kv_heads)),  # some files list it per layer
        "head_dim": head_dim,
        "rms_norm_eps": float(key.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key.get("rope.freq_base", 10_000.0)),
        "rope_scaling": _rope_scaling(key, rope_freqs, head_dim),
        "max_position_embeddings": int(key.get("context_length", 2048)),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if arch is GGUFArch.GEMMA3:
        config.update(_gemma3(key, config))
    else:
        config["hidden_act"] = "silu"
        config["attention_bias"] = False  # the loader sets it when the file has q/k/v biases
    return config


def _gemma3(key: "_Keys", config: dict[str, Any]) -> dict[str, Any]:
    layers = config["num_hidden_layers"]
    pattern = key.get("attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN)
    if isinstance(pattern, (int, np.integer)):
        sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]
    else:  # newer llama.cpp writes one bool per layer
        sliding = [bool(s) for s in pattern]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _GEMMA3_QUERY_SCALAR_BY_HIDDEN.get(config["hidden_size"], config["head_dim"]),
        "sliding_window": int(key.get("attention.sliding_window", 4096)),
        "sliding_window_pattern": _GEMMA3_SLIDING_PATTERN,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": _GEMMA3_LOCAL_ROPE_BASE,
        "final_logit_softcapping": key.get("final_logit_softcapping"),
        "attn_logit_softcapping": key.get("attn_logit_softcapping"),
    }


def _rope_scaling(key: "_Keys", rope_freqs: np.ndarray | None, head_dim: int) -> dict[str, Any] | None:
    kind = key.get("rope.scaling.type", "none")
    if rope_freqs is not None:
        return _llama3_from_factors(rope_freqs, float(key.get("rope.freq_base", 10_000.0)), head_dim)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(key.need("rope.scaling.factor"))}
    raise ModelLoadError(f"GGUF rope scaling type {kind!r} is not supported (supported: none, linear, llama3)")


def llama3_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores for HF's `llama3` RoPE scaling: [head_dim / 2]."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    short = wavelen < original_max_position_embeddings / high_freq_factor
    long = wavelen > original_max_position_embeddings / low_freq_factor
    return np.where(short, 1.0, np.where(long, factor, mid))


def _llama3_from_factors(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    params = {"rope_type": "llama3", "factor": float(np.max(rope_freqs)), **_LLAMA3_ROPE_GUESS}
    expect = llama3_factors(theta, head_dim, **{k: v for k, v in params.items() if k != "rope_type"})
    if expect.shape != rope_freqs.shape or not np.allclose(expect, rope_freqs, rtol=1e-5):
        raise ModelLoadError("GGUF rope_freqs tensor does not match llama3 RoPE scaling with the usual "
                             "low/high frequency factors (1, 4) and original context 8192")
    return params


class _Keys:
    """`{arch}.<name>` metadata lookups."""

    def __init__(self, meta: dict[str, Any], prefix: str) -> None:
        self.meta, self.prefix = meta, prefix

    def get(self, name: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.prefix}.{name}", default)

    def need(self, name: str) -> Any:
        if f"{self.prefix}.{name}" not in self.meta:
            raise ModelLoadError(f"GGUF metadata lacks {self.prefix}.{name}")
        return self.meta[f"{self.prefix}.{name}"]
