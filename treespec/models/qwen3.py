"""Qwen3: Llama's block with RMSNorm over each q and k head before RoPE, optional biases, head_dim 128 by
default, and Qwen2's sliding-window rule.
"""
from __future__ import annotations

from treespec.models.config import Defaults, HFConfig, ModelConfig, read_config
from treespec.models.family import Family, GGUFLayout
from treespec.models.llama import LlamaForCausalLM
from treespec.models.qwen2 import qwen_sliding, silu_without_bias


def qwen3_config(d: HFConfig) -> ModelConfig:
    bias = bool(d.get("attention_bias"))
    return read_config("qwen3", d, Defaults(max_position_embeddings=32768, head_dim=128), sliding=qwen_sliding,
                       qk_norm=True, qkv_bias=bias, o_bias=bias)


QWEN3 = Family("qwen3", LlamaForCausalLM, qwen3_config,
               gguf=GGUFLayout("qwen3", "Qwen3ForCausalLM", silu_without_bias))
