"""llama.cpp tensor names -> Hugging Face parameter names, per architecture.

GGUF names a layer's tensors `blk.N.<leaf>.weight|bias`; HF names them `model.layers.N.<module>.weight|bias`.
The leaves mean the same module in every supported family except `ffn_norm`: the norm before the MLP is
`post_attention_layernorm` in Llama/Qwen but `pre_feedforward_layernorm` in Gemma 3, whose
`post_attention_norm` is a fourth norm applied to the attention output.
"""
from __future__ import annotations

import re
from enum import Enum

from treespec.errors import ModelLoadError


class GGUFArch(str, Enum):
    """`general.architecture` values we load, and the HF `model_type` each becomes."""
    LLAMA = "llama"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    GEMMA3 = "gemma3"

    @property
    def model_type(self) -> str:
        return "gemma3_text" if self is GGUFArch.GEMMA3 else self.value

    @property
    def hf_class(self) -> str:
        return {GGUFArch.LLAMA: "LlamaForCausalLM", GGUFArch.QWEN2: "Qwen2ForCausalLM",
                GGUFArch.QWEN3: "Qwen3ForCausalLM", GGUFArch.GEMMA3: "Gemma3ForCausalLM"}[self]

    @property
    def permutes_qk(self) -> bool:
        """llama.cpp's converter interleaves Q/K rows for its rotary kernel, for 'llama' only."""
        return self is GGUFArch.LLAMA

    @property
    def norms_plus_one(self) -> bool:
        """llama.cpp stores Gemma's zero-centred RMSNorm weights as (1 + w) so one kernel serves all models."""
        return self is GGUFArch.GEMMA3


def parse_arch(name: str) -> GGUFArch:
    try:
        return GGUFArch(name)
    except ValueError:
        known = ", ".join(a.value for a in GGUFArch)
        raise ModelLoadError(f"GGUF architecture {name!r} is not supported (supported: {known})") from None


_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}

_GEMMA_LAYER = {**_LAYER, "ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL = re.compile(r"(\w+)\.(weight|bias)")

# Not parameters: Llama 3.x writes its precomputed RoPE frequency factors as a tensor (read into the config).
NON_PARAMETERS = frozenset({"rope_freqs.weight"})


def hf_name(gguf_name: str, arch: GGUFArch) -> str:
    """`blk.3.ffn_norm.weight` -> `model.layers.3.post_attention_layernorm.weight` (Llama)."""
    leaves = _GEMMA_LAYER if arch is GGUFArch.GEMMA3 else _LAYER
    if (m := _BLOCK.fullmatch(gguf_name)) and m.group(2) in leaves:
        return f"model.layers.{m.group(1)}.{leaves[m.group(2)]}.{m.group(3)}"
    if (m := _GLOBAL.fullmatch(gguf_name)) and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} is not part of a {arch.value} model that treespec knows")
