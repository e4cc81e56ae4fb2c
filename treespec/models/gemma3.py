"""Gemma 3 text decoder: "sandwich" norms (before and after both attention and MLP), (1 + w) RMSNorm,
embeddings scaled by sqrt(hidden), q/k norm, 5 sliding-window layers (local RoPE base) per global layer.
All of that except the block shape is in ModelConfig, read by `gemma3_config`.

llama.cpp's Gemma 3 files omit the local (sliding-layer) RoPE base, the sliding/full layer pattern and
`query_pre_attn_scalar`; transformers' `Gemma3TextConfig` defaults are the values every Gemma 3 size uses
(10,000; five sliding layers then one full; head_dim), except 27B, whose scalar is hidden/heads = 168.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Collection

import numpy as np
import torch

from treespec.attention import AttentionFn
from treespec.errors import ModelLoadError
from treespec.kernels import decode_ops
from treespec.models.base import CausalLM
from treespec.models.config import (Activation, Defaults, HFConfig, ModelConfig, RopeConfig, layer_types, opt_float,
                                    parse_rope, read_config)
from treespec.models.family import Family, GGUFLayout, MetadataGet
from treespec.models.layers import MLP, Attention, ForwardBatch, HFLoadable, RMSNorm

# a multimodal Gemma 3 checkpoint nests the text model (transformers 4.x and 5.x spellings)
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

_LOCAL_ROPE_BASE = 10_000.0
_SLIDING_PATTERN = 6  # layers i with (i + 1) % 6 != 0 slide
_QUERY_SCALAR_BY_HIDDEN = {5376: 168.0}  # 27B; every other size uses head_dim


class Gemma3Block(HFLoadable):
    def __init__(self, cfg: ModelConfig, layer: int, attend: AttentionFn) -> None:
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = Attention(cfg, layer, attend)
        self.mlp = MLP(cfg)

    def stack_norms(self) -> tuple[RMSNorm, RMSNorm, RMSNorm, RMSNorm]:
        """Before attention, before the MLP, after attention, after the MLP (models/decode_stack.py)."""
        return (self.input_layernorm, self.pre_feedforward_layernorm, self.post_attention_layernorm,
                self.post_feedforward_layernorm)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # x: [T, D] -> [T, D]
        a = self.self_attn(self.input_layernorm(x), batch)
        post_a, pre_m = self.post_attention_layernorm, self.pre_feedforward_layernorm
        post_m = self.post_feedforward_layernorm
        if batch.glue:  # each residual add with the norms beside it in one call, rounded as below
            h, z = decode_ops.residual_norm(x, a, post_a.weight, post_a.eps, pre_m.weight)
            return decode_ops.residual_norm(h, self.mlp(z), post_m.weight, post_m.eps)[0]
        h = x + post_a(a)
        return h + post_m(self.mlp(pre_m(h)))


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


# ------------------------------------------------------------------------------------------------- config

def gemma3_config(d: HFConfig) -> ModelConfig:
    """A "gemma3_text" config, or a multimodal "gemma3" one read through its text_config."""
    if d.get("model_type") == "gemma3":
        if not isinstance(d.get("text_config"), dict):
            raise ModelLoadError("config: model_type 'gemma3' needs a 'text_config' object")
        d = {"model_type": "gemma3_text", "tie_word_embeddings": d.get("tie_word_embeddings", True),
             **d["text_config"]}
    bias = bool(d.get("attention_bias"))
    cfg = read_config("gemma3_text", d, Defaults(max_position_embeddings=131072, head_dim=256,
                                                 activation=Activation.GELU_TANH, tie_word_embeddings=True),
                      ropes=_ropes, sliding=_sliding, qk_norm=True, qkv_bias=bias, o_bias=bias,
                      query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
                      # transformers' Gemma 3 reads attn_logit_softcapping but never applies it (Gemma 2 did)
                      final_logit_softcapping=opt_float(d.get("final_logit_softcapping")), norm_unit_offset=True)
    if d.get("use_bidirectional_attention"):
        raise ModelLoadError("config: use_bidirectional_attention (Gemma embedding models) is not supported")
    return dataclasses.replace(cfg, embed_scale=math.sqrt(cfg.hidden_size))


def _ropes(d: HFConfig, max_pos: int) -> tuple[RopeConfig, RopeConfig]:
    """Full layers: rope_theta (1e6) and rope_scaling; sliding layers: rope_local_base_freq (1e4), unscaled;
    5.x files nest both under rope_parameters by layer type."""
    params = d.get("rope_parameters") or {}
    full = {"rope_theta": d.get("rope_theta", 1e6), **(d.get("rope_scaling") or {}),
            **(params.get("full_attention") or {})}
    local = {"rope_theta": d.get("rope_local_base_freq", _LOCAL_ROPE_BASE), **(params.get("sliding_attention") or {})}
    return parse_rope(full, max_pos), parse_rope(local, max_pos)


def _sliding(d: HFConfig, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    window = d.get("sliding_window")
    if window is None:
        window = 4096
    types = d.get("layer_types")
    if types is None:  # older Gemma 3 files: every `pattern`-th layer is global
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or _SLIDING_PATTERN)
        return window, tuple(bool((i + 1) % pattern) for i in range(layers))
    return window, layer_types(types, layers)


def _gguf_config(key: MetadataGet, config: HFConfig, tensors: Collection[str]) -> HFConfig:
    layers = config["num_hidden_layers"]
    pattern = key("attention.sliding_window_pattern", _SLIDING_PATTERN)
    if isinstance(pattern, (int, np.integer)):
        sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]
    else:  # newer llama.cpp writes one bool per layer
        sliding = [bool(s) for s in pattern]
    return {
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _QUERY_SCALAR_BY_HIDDEN.get(config["hidden_size"], config["head_dim"]),
        "sliding_window": int(key("attention.sliding_window", 4096)),
        "sliding_window_pattern": _SLIDING_PATTERN,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": _LOCAL_ROPE_BASE,
        "final_logit_softcapping": key("final_logit_softcapping", None),
        "attn_logit_softcapping": key("attn_logit_softcapping", None),
    }


# llama.cpp's `ffn_norm` is the norm before the MLP: Gemma 3 calls it pre_feedforward_layernorm, and its
# post_attention_layernorm is a fourth norm, on the attention output
_GGUF_LAYER_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                     "post_ffw_norm": "post_feedforward_layernorm"}

GEMMA3 = Family("gemma3_text", Gemma3ForCausalLM, gemma3_config, wrappers=("gemma3",),
                gguf=GGUFLayout("gemma3", "Gemma3ForCausalLM", _gguf_config, layer_names=_GGUF_LAYER_NAMES,
                                norms_plus_one=True))
