"""The supported families, and the calls that turn an HF config (+ state dict) into a ModelConfig or a model.

Adding a family: write models/<family>.py (its block or a reuse of Llama's, its config reader and defaults,
its GGUF layout if llama.cpp writes it, one `Family(...)` at the end) and list it in FAMILIES below.
"""
from __future__ import annotations

from typing import Any

import torch

from treespec.attention import AttentionBackend
from treespec.device import Placement
from treespec.errors import ModelLoadError
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig
from treespec.models.device_kernels import apply_kernels
from treespec.models.family import Family
from treespec.models.gemma3 import GEMMA3
from treespec.models.llama import LLAMA
from treespec.models.mistral import MISTRAL
from treespec.models.qwen2 import QWEN2
from treespec.models.qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA3)

_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in (f.model_type, *f.wrappers)}
_BY_GGUF_ARCH = {f.gguf.arch: f for f in FAMILIES if f.gguf is not None}


def family(model_type: Any) -> Family:
    """The family reading HF `model_type`; ModelLoadError naming the supported ones otherwise."""
    if not isinstance(model_type, str) or model_type not in _BY_MODEL_TYPE:
        known = ", ".join([f.model_type for f in FAMILIES] + [w for f in FAMILIES for w in f.wrappers])
        raise ModelLoadError(f"config: unsupported model_type {model_type!r} (supported: {known})")
    return _BY_MODEL_TYPE[model_type]


def gguf_family(arch: str) -> Family:
    """The family a GGUF `general.architecture` holds; ModelLoadError naming the supported ones otherwise."""
    if arch not in _BY_GGUF_ARCH:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_BY_GGUF_ARCH)})")
    return _BY_GGUF_ARCH[arch]


def model_config(config: dict[str, Any]) -> ModelConfig:
    """Normalise an HF config dict (config.json or PretrainedConfig.to_dict()); ModelLoadError if unusable."""
    return family(config.get("model_type")).config(config)


def build_model(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                attention: AttentionBackend | None = None, placement: Placement | None = None) -> CausalLM:
    """A model from an HF config dict and HF-named tensors; ModelLoadError if they don't fit.

    attention: force a kernel (default: SDPA, or the reference where a logit softcap needs it).
    placement: device, dtype and kernel set (default: fp32 on the CPU with the CPU kernels, whose oneDNN copies of
    the projections are made here, once the weights are final: models/device_kernels.py).
    """
    fam = family(config.get("model_type"))
    model = fam.model(fam.config(config), attention)
    model.load_state_dict_hf(tensors)
    return apply_kernels(model, placement or Placement()).eval()
