"""model_type -> model class, and the one call that turns an HF config + state dict into a model."""
from __future__ import annotations

from typing import Any

import torch

from treespec.attention import AttentionBackend
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig, ModelType
from treespec.models.gemma3 import Gemma3ForCausalLM
from treespec.models.layers import pack_linears
from treespec.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[ModelType, type[CausalLM]] = {
    ModelType.LLAMA: LlamaForCausalLM,
    ModelType.MISTRAL: LlamaForCausalLM,
    ModelType.QWEN2: LlamaForCausalLM,
    ModelType.QWEN3: LlamaForCausalLM,
    ModelType.GEMMA3: Gemma3ForCausalLM,
}


def build_model(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                attention: AttentionBackend | None = None) -> CausalLM:
    """An fp32 CPU model from an HF config dict and HF-named tensors; ModelLoadError if they don't fit.

    attention: force a kernel (default: SDPA, or the reference where a logit softcap needs it).
    The projections get their oneDNN copies here (models/matmul.py), once the weights are final.
    """
    cfg = ModelConfig.from_hf(config)
    model = MODEL_CLASSES[cfg.model_type](cfg, attention)
    model.load_state_dict_hf(tensors)
    pack_linears(model)
    return model.eval()
