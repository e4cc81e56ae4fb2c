"""Mistral: Llama's block without biases, with a sliding window on every layer when the config sets one.

llama.cpp writes Mistral checkpoints as architecture "llama", so they load through models/llama.py.
"""
from __future__ import annotations

from treespec.models.config import Defaults, HFConfig, ModelConfig, read_config
from treespec.models.family import Family
from treespec.models.llama import LlamaForCausalLM


def _sliding(d: HFConfig, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = d.get("sliding_window")
    return window, (window is not None,) * layers


def mistral_config(d: HFConfig) -> ModelConfig:
    return read_config("mistral", d, Defaults(max_position_embeddings=131072), sliding=_sliding)


MISTRAL = Family("mistral", LlamaForCausalLM, mistral_config)
