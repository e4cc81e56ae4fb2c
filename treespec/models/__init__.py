"""Target models: one decoder implementation per family, built from HF configs and state dicts."""
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig, ModelType
from treespec.models.registry import build_model

__all__ = ["CausalLM", "ModelConfig", "ModelType", "build_model"]
