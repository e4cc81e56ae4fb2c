"""Load a GGUF checkpoint as HF-named, HF-shaped fp32 tensors plus an HF-style config.

Three things llama.cpp's converter changes on the way in are undone here:
- names and dims: `blk.N.attn_q.weight` with dims fastest-first -> `model.layers.N.self_attn.q_proj.weight`
  [out, in] (`gguf_file` reverses the dims, `gguf_names` renames);
- Llama's Q/K rows: permuted per head from HF's rotate-half order (pairs i, i + d/2) to interleaved pairs
  (2i, 2i + 1); `unpermute_qk` is the inverse;
- Gemma's norms: stored as (1 + w); HF's Gemma RMSNorm multiplies by (1 + w) itself, so we subtract 1.
Which of these a file needs, and its family's names and missing config keys, its family's GGUFLayout says.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from treespec.errors import ModelLoadError
from treespec.models.family import GGUFLayout
from treespec.models.registry import gguf_family
from treespec.weights.dequant import dequantize
from treespec.weights.gguf_config import hf_config
from treespec.weights.gguf_file import GGUFFile
from treespec.weights.gguf_names import NON_PARAMETERS, hf_name


@dataclass
class GGUFWeights:
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]   # HF names -> fp32
    quant_types: dict[str, int]        # GGML type name -> tensor count


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """w: [n_heads * head_dim, ...] in llama.cpp's interleaved rotary order -> HF's rotate-half order."""
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).transpose(1, 2).reshape(w.shape)


def load_gguf_weights(gguf: GGUFFile, progress: bool = False) -> GGUFWeights:
    family = gguf_family(str(gguf.metadata.get("general.architecture", "<missing>")))
    layout = family.gguf
    infos = {t.name: t for t in gguf.tensors}
    if "token_embd.weight" not in infos:
        raise ModelLoadError(f"{gguf.path}: no token_embd.weight tensor; not a language model GGUF")
    rope_freqs = None
    if "rope_freqs.weight" in infos:
        info = infos["rope_freqs.weight"]
        rope_freqs = dequantize(gguf.raw(info), info.qtype, info.shape)
    config = hf_config(gguf.metadata, family, vocab_size=infos["token_embd.weight"].shape[0],
                       tied="output.weight" not in infos, rope_freqs=rope_freqs, tensor_names=infos.keys())
    tensors: dict[str, torch.Tensor] = {}
    params = [t for t in gguf.tensors if t.name not in NON_PARAMETERS]
    for info in tqdm(params, desc="dequantizing", unit="tensor", disable=not progress, leave=False):
        w = torch.from_numpy(dequantize(gguf.raw(info), info.qtype, info.shape))
        name = hf_name(info.name, layout.arch, layout.layer_names)
        tensors[name] = _undo_conversion(w, info.name, layout, config)
    return GGUFWeights(config, tensors, dict(Counter(t.qtype.name for t in gguf.tensors)))


def permuted_heads(gguf_name: str, layout: GGUFLayout, config: dict[str, Any]) -> int | None:
    """The head count of a Q/K tensor whose rows llama.cpp permuted (undo with unpermute_qk); None otherwise."""
    if layout.permutes_qk and ".attn_q." in gguf_name:
        return config["num_attention_heads"]
    if layout.permutes_qk and ".attn_k." in gguf_name:
        return config["num_key_value_heads"]
    return None


def _undo_conversion(w: torch.Tensor, gguf_name: str, layout: GGUFLayout, config: dict[str, Any]) -> torch.Tensor:
    if (heads := permuted_heads(gguf_name, layout, config)) is not None:
        return unpermute_qk(w, heads)
    if layout.norms_plus_one and gguf_name.endswith("norm.weight"):
        return w.sub_(1.0)
    return w
