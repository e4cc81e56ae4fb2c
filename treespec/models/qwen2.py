"""Qwen2: Llama's block with q/k/v biases (always, whatever `attention_bias` says) and an optional sliding
window on the layers from `max_window_layers` on (or as `layer_types` lists them).
"""
from __future__ import annotations

from typing import Collection

from treespec.models.config import Defaults, HFConfig, ModelConfig, layer_types, read_config
from treespec.models.family import Family, GGUFLayout, MetadataGet
from treespec.models.llama import LlamaForCausalLM


def qwen_sliding(d: HFConfig, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """Qwen2/Qwen3: a window only with `use_sliding_window`; layers i >= max_window_layers slide."""
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    if window is None:
        return None, (False,) * layers
    types = d.get("layer_types")
    if types is None:
        first = int(d.get("max_window_layers", 28))
        return window, tuple(i >= first for i in range(layers))
    return window, layer_types(types, layers)


def qwen2_config(d: HFConfig) -> ModelConfig:
    return read_config("qwen2", d, Defaults(max_position_embeddings=32768), sliding=qwen_sliding, qkv_bias=True)


def silu_without_bias(key: MetadataGet, config: HFConfig, tensors: Collection[str]) -> HFConfig:
    """The GGUF config keys of a Qwen family (its biases follow from the model type, not `attention_bias`)."""
    return {"hidden_act": "silu", "attention_bias": False}


QWEN2 = Family("qwen2", LlamaForCausalLM, qwen2_config,
               gguf=GGUFLayout("qwen2", "Qwen2ForCausalLM", silu_without_bias))
