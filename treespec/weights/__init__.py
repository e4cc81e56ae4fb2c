"""Checkpoint loading: safetensors directories and GGUF files -> HF-named fp32 tensors, config, tokenizer."""
from treespec.weights.loader import Checkpoint, load_checkpoint, resolve_model

__all__ = ["Checkpoint", "load_checkpoint", "resolve_model"]
