"""Llama-style decoder (also serves Mistral, Qwen2 and Qwen3): pre-norm attention and MLP with residuals.

The families differ only in what ModelConfig already says: Qwen2's q/k/v bias, Qwen3's q/k RMSNorm,
Mistral/Qwen2 sliding windows, Llama 3 RoPE scaling.
"""
from __future__ import annotations

import torch

from treespec.attention import AttentionFn
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig
from treespec.models.layers import MLP, Attention, ForwardBatch, HFLoadable, RMSNorm


class LlamaBlock(HFLoadable):
    def __init__(self, cfg: ModelConfig, layer: int, attend: AttentionFn) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, attend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF's name; it is the pre-MLP norm
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # x: [T, D] -> [T, D]
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(CausalLM):
    block = LlamaBlock
