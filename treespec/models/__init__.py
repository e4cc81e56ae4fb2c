"""Target models: one file per family (models/registry.py lists them), built from HF configs and state dicts."""
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig
from treespec.models.registry import FAMILIES, build_model, model_config

__all__ = ["FAMILIES", "CausalLM", "ModelConfig", "build_model", "model_config"]
