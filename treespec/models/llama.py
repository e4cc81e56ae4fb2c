"""Llama: pre-norm attention and MLP with residuals. Its block and model class also serve Mistral, Qwen2 and
Qwen3 (models/mistral.py, qwen2.py, qwen3.py), which differ only in what their ModelConfig says.
"""
from __future__ import annotations

from typing import Collection

import torch

from treespec.attention import AttentionFn
from treespec.models.base import CausalLM
from treespec.models.config import Defaults, HFConfig, ModelConfig, read_config
from treespec.models.family import Family, GGUFLayout, MetadataGet
from treespec.models.layers import MLP, Attention, ForwardBatch, HFLoadable, RMSNorm


class LlamaBlock(HFLoadable):
    def __init__(self, cfg: ModelConfig, layer: int, attend: AttentionFn) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, attend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # HF's name; it is the pre-MLP norm
        self.mlp = MLP(cfg)

    def stack_norms(self) -> tuple[RMSNorm, RMSNorm, None, None]:
        """Before attention, before the MLP; no post norms (models/decode_stack.py)."""
        return self.input_layernorm, self.post_attention_layernorm, None, None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # x: [T, D] -> [T, D]
        h = x + self.self_attn(self.input_layernorm(x), batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(CausalLM):
    block = LlamaBlock


def llama_config(d: HFConfig) -> ModelConfig:
    """Llama's optional biases; no layer slides; Llama 3 RoPE scaling is read with the other RoPE kinds."""
    bias = bool(d.get("attention_bias"))
    return read_config("llama", d, Defaults(max_position_embeddings=2048),
                       qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias")))


def _gguf_config(key: MetadataGet, config: HFConfig, tensors: Collection[str]) -> HFConfig:
    return {"hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in tensors}


LLAMA = Family("llama", LlamaForCausalLM, llama_config,
               gguf=GGUFLayout("llama", "LlamaForCausalLM", _gguf_config, permutes_qk=True))
