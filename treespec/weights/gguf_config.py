"""An HF `config.json`-style dict from GGUF metadata; the family adds what llama.cpp leaves out.

The keys every family shares are read here; a family's own keys (activation, sliding layers, Gemma's local RoPE
base...) come from its GGUFLayout.config rule (models/<family>.py). Llama 3.x files store their RoPE scaling only
as a precomputed per-frequency factor tensor (`rope_freqs`); we recover HF's `llama3` parameters from it and check
that they reproduce it exactly.
"""
from __future__ import annotations

import math
from typing import Any, Collection

import numpy as np

from treespec.errors import ModelLoadError
from treespec.models.family import Family

_LLAMA3_ROPE_GUESS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def hf_config(meta: dict[str, Any], family: Family, vocab_size: int, tied: bool, rope_freqs: np.ndarray | None,
              tensor_names: Collection[str]) -> dict[str, Any]:
    """The config dict for a GGUF of `family` (HF key names); rope_freqs: [head_dim / 2] factors or None."""
    layout = family.gguf
    key = _Keys(meta, layout.arch)
    hidden, heads = int(key.need("embedding_length")), int(key.need("attention.head_count"))
    head_dim = int(key.get("attention.key_length", hidden // heads))
    kv_heads = key.get("attention.head_count_kv", heads)
    config: dict[str, Any] = {
        "architectures": [layout.hf_class],
        "model_type": family.model_type,
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
    config.update(layout.config(key.get, config, tensor_names))
    return config


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
