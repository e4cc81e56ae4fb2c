"""Family: everything one model family file declares, so that config reading and GGUF loading need no branch
on the family.

A family file (models/llama.py, models/gemma3.py, ...) ends with one `Family(...)`: the HF `model_type` it reads,
its model class, its config reader (transformers' defaults for what a config.json leaves out, as mlx-lm's
per-family `ModelArgs`) and, when llama.cpp writes the family, its `GGUFLayout` (how the converter renamed and
changed the tensors and which config keys it leaves out). Checkpoint renames stay on the model class
(`CausalLM.canonical_names`, mlx-lm's `sanitize`). models/registry.py lists the families and weights/gguf.py
reads a GGUF's layout from there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from treespec.models.base import CausalLM
from treespec.models.config import HFConfig, ModelConfig

MetadataGet = Callable[[str, Any], Any]      # GGUF `{arch}.<name>` metadata lookup: (name, default) -> value
# (metadata, the config so far, the file's tensor names) -> the family's extra HF config keys
GGUFConfigRule = Callable[[MetadataGet, HFConfig, Collection[str]], HFConfig]


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp stores a family: `general.architecture`, what its converter changed, what it left out."""
    arch: str                                  # `general.architecture`
    hf_class: str                              # the HF class named in the config's `architectures`
    config: GGUFConfigRule                     # family keys the GGUF metadata lacks (activation, layer kinds, ...)
    # layer tensor leaves (`blk.N.<leaf>`) that mean another HF module here than in weights/gguf_names.py's table
    layer_names: Mapping[str, str] = field(default_factory=dict)
    permutes_qk: bool = False                  # Q/K rows interleaved for llama.cpp's rotary kernel
    norms_plus_one: bool = False               # zero-centred RMSNorm weights stored as (1 + w)


@dataclass(frozen=True)
class Family:
    model_type: str                            # HF `model_type` (config.json), also ModelConfig.model_type
    model: type[CausalLM]
    config: Callable[[HFConfig], ModelConfig]  # HF config dict -> ModelConfig; ModelLoadError if unusable
    wrappers: tuple[str, ...] = ()             # other `model_type`s whose config nests this one (multimodal)
    gguf: GGUFLayout | None = None             # None: no GGUF architecture maps to this family
