"""ModelConfig: one normalised view of a Hugging Face `config.json`, and the reading every family shares.

HF spells the same idea several ways across families and transformers versions (`rope_scaling` + `rope_theta`
in 4.x files, `rope_parameters` in 5.x, three ways to say which layers slide). `read_config` folds the spellings
every family shares into explicit fields; each family file passes its own defaults (transformers' class defaults)
and readers for what only it has, so the model code never looks at a raw dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from treespec.errors import ModelLoadError


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
    model_type: str                 # the HF model_type of the family that read it (models/registry.py)
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


# ------------------------------------------------------------------------------------------ shared reading

HFConfig = dict[str, Any]  # a config.json-style dict (HF key names)
RopeReader = Callable[[HFConfig, int], tuple[RopeConfig, RopeConfig]]       # (d, max_pos) -> (full, sliding)
SlidingReader = Callable[[HFConfig, int], tuple[int | None, tuple[bool, ...]]]  # (d, layers) -> window, sliding


@dataclass(frozen=True)
class Defaults:
    """A family's transformers class defaults for keys a config.json may leave out."""
    max_position_embeddings: int
    head_dim: int | None = None      # None: hidden_size // num_attention_heads
    activation: Activation = Activation.SILU
    tie_word_embeddings: bool = False


def no_sliding(d: HFConfig, layers: int) -> tuple[int | None, tuple[bool, ...]]:
    return None, (False,) * layers


def read_config(model_type: str, d: HFConfig, defaults: Defaults, ropes: RopeReader | None = None,
                sliding: SlidingReader = no_sliding, **fields: Any) -> ModelConfig:
    """The fields every family reads alike, with the family's `defaults`; ModelLoadError if unusable.

    ropes: the family's RoPE reader (default: one RoPE for every layer, from rope_theta/rope_scaling or
    rope_parameters). sliding: which layers slide (default: none). fields: the family's other ModelConfig fields.
    """
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if d.get(k) is None]
    if missing:
        raise ModelLoadError(f"config ({model_type}): missing required field(s) {', '.join(missing)}")
    hidden, heads, layers = int(d["hidden_size"]), int(d["num_attention_heads"]), int(d["num_hidden_layers"])
    kv_heads = int(d.get("num_key_value_heads") or heads)
    head_dim = d.get("head_dim") or defaults.head_dim or hidden // heads
    if heads % kv_heads:
        raise ModelLoadError(f"config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    max_pos = int(d.get("max_position_embeddings") or defaults.max_position_embeddings)
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("config: partial_rotary_factor != 1 is not supported")
    rope, rope_local = ropes(d, max_pos) if ropes else (_one_rope(model_type, d, max_pos),) * 2
    window, slides = sliding(d, layers)
    return ModelConfig(
        model_type=model_type, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=int(head_dim), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=rope, rope_local=rope_local, max_position_embeddings=max_pos,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", defaults.tie_word_embeddings)),
        sliding_window=window, sliding_layers=slides, activation=_activation(d, defaults.activation), **fields)


def layer_types(types: list[str], layers: int) -> tuple[bool, ...]:
    """HF's `layer_types` list -> which layers slide."""
    if len(types) != layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"config: layer_types must list {layers} of 'sliding_attention'/'full_attention'")
    return tuple(t == "sliding_attention" for t in types)


def parse_rope(p: HFConfig, max_pos: int) -> RopeConfig:
    """One RoPE from HF's keys (`rope_theta` plus a `rope_type`/`type` scaling and its parameters)."""
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


def opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _one_rope(model_type: str, d: HFConfig, max_pos: int) -> RopeConfig:
    """The RoPE of every layer, from either rope_parameters (5.x) or rope_theta/rope_scaling (4.x)."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params:
        raise ModelLoadError(f"config: per-layer-type rope_parameters are not supported for {model_type}")
    return parse_rope({"rope_theta": d.get("rope_theta", 1e4), **(d.get("rope_scaling") or {}), **params}, max_pos)


def _activation(d: HFConfig, default: Activation) -> Activation:
    name = d.get("hidden_activation") or d.get("hidden_act") or default.value
    try:
        return Activation(name)
    except ValueError:
        raise ModelLoadError(f"config: unsupported activation {name!r}") from None
