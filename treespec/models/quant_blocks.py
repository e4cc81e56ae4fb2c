"""Linear layers that compute from the GGUF's quantized blocks (exact: the dequantized model's math).

Why: a decode step is memory-bound, and the dequantized fp32 body streams 400 MB per token where its blocks,
repacked as int8 codes plus per-group scales (kernels/block_layout.py), stream ~117 MB. Activations and
accumulation stay fp32 and the weights are bit-identical to the dequantized ones, so outputs agree with the
dequantized model to float rounding, and a row's output never depends on the other rows of its forward.
`use_blocks` swaps them into a model built the default way (weight_quantization "blocks"), and `use_head_blocks`
lets the LM head's greedy argmax of a few rows read a Q8_0 head's blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from treespec.kernels.block_layout import PackedBlocks, concat_rows
from treespec.kernels.bf16_screen import Bf16Screen
from treespec.kernels.block_mm import block_mm_parts, compiled
from treespec.kernels.q8_head import Q8Head, compiled as head_kernel_compiled

# (block child, projection) -> the HF weights fused into it, in order
_PROJECTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("self_attn", "qkv_proj"): ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn", "o_proj"): ("self_attn.o_proj",),
    ("mlp", "gate_up_proj"): ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp", "down_proj"): ("mlp.down_proj",),
}


class BlockQuantLinear(nn.Module):
    """y = x W^T (+ b), W held as PackedBlocks; x: [T, in] fp32 like models.layers.Linear."""

    def __init__(self, blocks: PackedBlocks, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = blocks.shape
        self.group = blocks.group
        self.register_buffer("q", blocks.q)
        self.register_buffer("scale", blocks.scale)
        self.register_buffer("min", blocks.min)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def blocks(self) -> PackedBlocks:
        return PackedBlocks(self.q, self.scale, self.min, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        b = self._buffers  # read directly: Module.__getattr__ per buffer and call is measurable at 72 calls a step
        y = block_mm_parts(x.float(), b["q"], b["scale"], b["min"], self.group)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"bits={self.blocks.bits}, min={self.min is not None}, bias={self.bias is not None}")


def use_blocks(model: nn.Module, blocks: dict[str, PackedBlocks]) -> int:
    """Swap each decoder block's projections whose HF weights are all in `blocks` for BlockQuantLinear.

    model: a CausalLM (model.layers[i].self_attn / .mlp); blocks: HF weight names -> PackedBlocks. Returns how
    many were swapped: none where the kernel cannot be built here, so the dequantized fp32 Linears stay.
    """
    if compiled() is None:
        return 0
    swapped = 0
    for i, layer in enumerate(model.layers):
        for (child, proj), parts in _PROJECTIONS.items():
            names = [f"model.layers.{i}.{part}.weight" for part in parts]
            if not all(n in blocks for n in names):
                continue
            parent = getattr(layer, child)
            old = getattr(parent, proj)
            setattr(parent, proj, BlockQuantLinear(concat_rows([blocks[n] for n in names]), old.bias))
            swapped += 1
    return swapped


def use_head_blocks(model: nn.Module, blocks: PackedBlocks | None) -> bool:
    """Attach a Q8_0 head's blocks to model.lm_head (models/lm_head.py: argmax of few rows reads them, and where
    the CPU has AVX512_BF16 the screen for more rows too); False, with the head unchanged, when there are none or
    the head kernel cannot be built here."""
    if blocks is None or head_kernel_compiled() is None:
        return False
    head = Q8Head(blocks, model.lm_head.softcap)
    model.lm_head.use_blocks_head(head, Bf16Screen.build(head))
    return True
