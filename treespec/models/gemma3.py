"""Gemma 3 text decoder: "sandwich" norms (before and after both attention and MLP), (1 + w) RMSNorm,
embeddings scaled by sqrt(hidden), q/k norm, 5 sliding-window layers (local RoPE base) per global layer.
All of that except the block shape is in ModelConfig.
"""
from __future__ import annotations

import torch

from treespec.attention import AttentionFn
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig
from treespec.models.layers import MLP, Attention, ForwardBatch, HFLoadable, RMSNorm

# a multimodal Gemma 3 checkpoint nests the text model (transformers 4.x and 5.x spellings)
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class Gemma3Block(HFLoadable):
    def __init__(self, cfg: ModelConfig, layer: int, attend: AttentionFn) -> None:
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = Attention(cfg, layer, attend)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # x: [T, D] -> [T, D]
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), batch))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3ForCausalLM(CausalLM):
    block = Gemma3Block

    def canonical_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep the text model of a multimodal checkpoint, under the text-only names."""
        out = {}
        for name, t in tensors.items():
            if name.startswith(_VISION_PREFIXES):
                continue
            for old, new in _TEXT_PREFIXES.items():
                if name.startswith(old):
                    name = new + name[len(old):]
                    break
            out[name] = t
        return out
