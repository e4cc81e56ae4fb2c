"""A GGUF's quantized 2-D weights kept as blocks (kernels/block_layout.py) under their HF names.

The opt-in twin of gguf.load_gguf_weights for the projections: the same renaming and the same Llama Q/K row
unpermutation (a row permutation moves whole blocks, so it applies to codes and scales alike). Tensors of
other types (F32, F16, types without a block kernel) are left to the dequantizing loader.
"""
from __future__ import annotations

from typing import Any

from gguf import GGMLQuantizationType as Q

from treespec.kernels.block_layout import PackedBlocks, map_rows, pack, packable
from treespec.models.registry import gguf_family
from treespec.weights.gguf import permuted_heads, unpermute_qk
from treespec.weights.gguf_file import GGUFFile
from treespec.weights.gguf_names import NON_PARAMETERS, hf_name


def load_gguf_blocks(gguf: GGUFFile, config: dict[str, Any]) -> dict[str, PackedBlocks]:
    """HF weight name -> PackedBlocks for every 2-D block-quantized layer weight (config: the HF config that
    gguf.load_gguf_weights made, for the head counts)."""
    layout = gguf_family(str(gguf.metadata.get("general.architecture", "<missing>"))).gguf
    out: dict[str, PackedBlocks] = {}
    for info in gguf.tensors:
        if info.name in NON_PARAMETERS or not info.name.startswith("blk.") or len(info.shape) != 2 \
                or not packable(info.qtype):
            continue
        blocks = pack(gguf.raw(info), info.qtype, info.shape)
        if (heads := permuted_heads(info.name, layout, config)) is not None:
            blocks = map_rows(blocks, lambda t: unpermute_qk(t, heads))
        out[hf_name(info.name, layout.arch, layout.layer_names)] = blocks
    return out


def load_head_blocks(gguf: GGUFFile) -> PackedBlocks | None:
    """The output head's blocks (`output.weight`, else the tied `token_embd.weight`) when it is Q8_0, the one
    type with a head kernel (kernels/q8_head.py); None otherwise."""
    infos = {t.name: t for t in gguf.tensors}
    info = infos.get("output.weight", infos.get("token_embd.weight"))
    if info is None or info.qtype != Q.Q8_0 or len(info.shape) != 2:
        return None
    return pack(gguf.raw(info), info.qtype, info.shape)
