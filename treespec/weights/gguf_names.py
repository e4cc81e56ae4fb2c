"""llama.cpp tensor names -> Hugging Face parameter names.

GGUF names a layer's tensors `blk.N.<leaf>.weight|bias`; HF names them `model.layers.N.<module>.weight|bias`.
The table below is what the leaves mean in Llama-style families; a family whose leaves mean other modules says
so in its GGUFLayout.layer_names (models/gemma3.py: `ffn_norm` is its pre-MLP norm, plus two more norms).
"""
from __future__ import annotations

import re
from typing import Mapping

from treespec.errors import ModelLoadError

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)")

# Not parameters: Llama 3.x writes its precomputed RoPE frequency factors as a tensor (read into the config).
NON_PARAMETERS = frozenset({"rope_freqs.weight"})


def hf_name(gguf_name: str, arch: str, layer_names: Mapping[str, str]) -> str:
    """`blk.3.ffn_norm.weight` -> `model.layers.3.post_attention_layernorm.weight` (Llama).

    layer_names: the family's leaves that differ from (or add to) the common table."""
    leaves = {**_LAYER, **layer_names}
    if (m := _BLOCK.fullmatch(gguf_name)) and m.group(2) in leaves:
        return f"model.layers.{m.group(1)}.{leaves[m.group(2)]}.{m.group(3)}"
    if (m := _GLOBAL.fullmatch(gguf_name)) and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} is not part of a {arch} model that treespec knows")
