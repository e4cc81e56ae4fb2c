"""ModelConfig: one normalised view of a Hugging Face `config.json` for every supported family.

HF spells the same idea several ways across families and transformers versions (`rope_scaling` + `rope_theta`
in 4.x files, `rope_parameters` in 5.x, Gemma's nested per-layer-type RoPE, three ways to say which layers
slide). `ModelConfig.from_hf` folds them into explicit fields with transformers' own defaults, so the model
code never looks at a raw dict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

from treespec.errors import ModelLoadError


class ModelType(str, Enum):
    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    GEMMA3 = "gemma3_text"  # a multimodal "gemma3" config is read through its text_config


class Activation(str, Enum):
    SILU = "silu"
    GELU_TANH = "gelu_pytorch_tanh"
    GELU = "gelu"


class RopeType(str, Enum):
    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer kind: base frequency and HF's `rope_type` scaling."""
    theta: float
    kind: RopeType = RopeType.DEFAULT
    factor: float = 1.0                    # linear, llama3
    low_freq_factor: float = 1.0           # llama3
    high_freq_factor: float = 4.0          # llama3
    original_max_position_embeddings: int = 0  # llama3


@dataclass(frozen=True)
class ModelConfig:
    model_type: ModelType
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig                # full-attention layers
    rope_local: RopeConfig          # sliding-window layers (Gemma 3: base 10k; others: same as rope)
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None      # window of the sliding layers; None: no layer slides
    sliding_layers: tuple[bool, ...]
    activation: Activation = Activation.SILU
    qk_norm: bool = False           # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden_size)
    norm_unit_offset: bool = False    # Gemma's RMSNorm scales by (1 + w)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def window(self, layer: int) -> int | None:
        """Sliding window of a layer (keys with q_pos - k_pos < window are visible), None for full attention."""
        return self.sliding_window if self.sliding_layers[layer] else None

    def layer_rope(self, layer: int) -> RopeConfig:
        return self.rope_local if self.sliding_layers[layer] else self.rope

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Normalise an HF config dict (config.json or PretrainedConfig.to_dict()); ModelLoadError if unusable."""
        top = d
        if d.get("model_type") == "gemma3":
            if not isinstance(d.get("text_config"), dict):
                raise ModelLoadError("config: model_type 'gemma3' needs a 'text_config' object")
            d = {"model_type": "gemma3_text", "tie_word_embeddings": top.get("tie_word_embeddings", True),
                 **d["text_config"]}
        try:
            mt = ModelType(d.get("model_type"))
        except ValueError:
            known = ", ".join([t.value for t in ModelType] + ["gemma3"])
            raise ModelLoadError(f"config: unsupported model_type {d.get('model_type')!r} "
                                 f"(supported: {known})") from None
        return _parse(mt, d)


def _parse(mt: ModelType, d: dict[str, Any]) -> ModelConfig:
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if d.get(k) is None]
    if missing:
        raise ModelLoadError(f"config ({mt.value}): missing required field(s) {', '.join(missing)}")
    gemma = mt is ModelType.GEMMA3
    hidden, heads, layers = int(d["hidden_size"]), int(d["num_attention_heads"]), int(d["num_hidden_layers"])
    kv_heads = int(d.get("num_key_value_heads") or heads)
    head_dim = d.get("head_dim") or _DEFAULT_HEAD_DIM.get(mt) or hidden // heads
    if heads % kv_heads:
        raise ModelLoadError(f"config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    max_pos = int(d.get("max_position_embeddings") or _DEFAULT_MAX_POS[mt])
    rope, rope_local = _ropes(mt, d, max_pos)
    window, sliding = _sliding(mt, d, layers)
    if gemma and d.get("use_bidirectional_attention"):
        raise ModelLoadError("config: use_bidirectional_attention (Gemma embedding models) is not supported")
    return ModelConfig(
        model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=int(head_dim), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=rope, rope_local=rope_local, max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
        sliding_window=window, sliding_layers=sliding,
        activation=_activation(d, gemma),
        qk_norm=mt in (ModelType.QWEN3, ModelType.GEMMA3),
        qkv_bias=mt is ModelType.QWEN2 or (mt is not ModelType.MISTRAL and bool(d.get("attention_bias"))),
        o_bias=mt not in (ModelType.QWEN2, ModelType.MISTRAL) and bool(d.get("attention_bias")),
        mlp_bias=mt is ModelType.LLAMA and bool(d.get("mlp_bias")),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)) if gemma else None,
        attn_logit_softcapping=None,  # transformers' Gemma 3 reads this key but never applies it (Gemma 2 did)
        final_logit_softcapping=_opt_float(d.get("final_logit_softcapping")) if gemma else None,
        embed_scale=math.sqrt(hidden) if gemma else None,
        norm_unit_offset=gemma,
    )


# transformers' class defaults for fields a config.json may leave out
_DEFAULT_HEAD_DIM = {ModelType.QWEN3: 128, ModelType.GEMMA3: 256}
_DEFAULT_MAX_POS = {ModelType.LLAMA: 2048, ModelType.MISTRAL: 131072, ModelType.QWEN2: 32768,
                    ModelType.QWEN3: 32768, ModelType.GEMMA3: 131072}


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _activation(d: dict[str, Any], gemma: bool) -> Activation:
    name = d.get("hidden_activation") or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    try:
        return Activation(name)
    except ValueError:
        raise ModelLoadError(f"config: unsupported activation {name!r}") from None


def _sliding(mt: ModelType, d: dict[str, Any], layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """Which layers use a sliding window, following each family's HF rules."""
    window = d.get("sliding_window")
    if mt is ModelType.LLAMA:
        return None, (False,) * layers
    if mt is ModelType.MISTRAL:  # Mistral slides on every layer when a window is set
        return window, (window is not None,) * layers
    if mt in (ModelType.QWEN2, ModelType.QWEN3):
        if not d.get("use_sliding_window", False):
            window = None
        if window is None:
            return None, (False,) * layers
        types = d.get("layer_types")
        if types is None:
            first = int(d.get("max_window_layers", 28))
            return window, tuple(i >= first for i in range(layers))
        return window, _layer_types(types, layers)
    if window is None:
        window = 4096
    types = d.get("layer_types")
    if types is None:  # older Gemma 3 files: every `pattern`-th layer is global
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        return window, tuple(bool((i + 1) % pattern) for i in range(layers))
    return window, _layer_types(types, layers)


def _layer_types(types: list[str], layers: int) -> tuple[bool, ...]:
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"config: layer_types must list {layers} of 'sliding_attention'/'full_attention'")
    return tuple(t == "sliding_attention" for t in types)


def _ropes(mt: ModelType, d: dict[str, Any], max_pos: int) -> tuple[RopeConfig, RopeConfig]:
    """(full-layer rope, sliding-layer rope) from either rope_parameters (5.x) or rope_theta/rope_scaling (4.x)."""
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("config: partial_rotary_factor != 1 is not supported")
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    if mt is ModelType.GEMMA3:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        full = {"rope_theta": d.get("rope_theta", 1e6), **scaling, **full}
        local = {"rope_theta": d.get("rope_local_base_freq", 1e4), **local}
        return _rope(full, max_pos), _rope(local, max_pos)
    if "full_attention" in params:
        raise ModelLoadError(f"config: per-layer-type rope_parameters are not supported for {mt.value}")
    rope = _rope({"rope_theta": d.get("rope_theta", 1e4), **scaling, **params}, max_pos)
    return rope, rope


def _rope(p: dict[str, Any], max_pos: int) -> RopeConfig:
    name = p.get("rope_type", p.get("type", "default"))
    try:
        kind = RopeType(name)
    except ValueError:
        raise ModelLoadError(f"config: unsupported rope scaling type {name!r} "
                             f"(supported: {', '.join(t.value for t in RopeType)})") from None
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("config: partial_rotary_factor != 1 is not supported")
    theta = float(p["rope_theta"])
    if kind is RopeType.DEFAULT:
        return RopeConfig(theta)
    if "factor" not in p:
        raise ModelLoadError(f"config: rope scaling {name!r} needs a 'factor'")
    if kind is RopeType.LINEAR:
        return RopeConfig(theta, kind, factor=float(p["factor"]))
    try:
        return RopeConfig(theta, kind, factor=float(p["factor"]), low_freq_factor=float(p["low_freq_factor"]),
                          high_freq_factor=float(p["high_freq_factor"]),
                          original_max_position_embeddings=int(p.get("original_max_position_embeddings") or max_pos))
    except KeyError as e:
        raise ModelLoadError(f"config: llama3 rope scaling needs {e.args[0]!r}") from None
