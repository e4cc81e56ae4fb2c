"""Where a rank gets the target: every rank builds the full model itself (from the file, or from tensors handed to
it), then keeps its shard. A source is pickled into spawned workers, so it carries a path or tensors, never a model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from treespec.config import WeightQuantization
from treespec.models.base import CausalLM
from treespec.models.registry import build_model

log = logging.getLogger(__name__)


class ModelSource(Protocol):
    weight_quantization: WeightQuantization

    def build(self) -> CausalLM:
        """The full fp32 target (weights packed)."""

    def quantize(self, model: CausalLM) -> None:
        """Put the model's weights into the format it runs in (weight_quantization), in place."""


@dataclass
class CheckpointSource:
    """A checkpoint on disk (HF directory or GGUF), as every rank of the node can read it."""
    path: Path
    weight_quantization: WeightQuantization = WeightQuantization.NONE
    hf_config: dict[str, Any] | None = None  # the checkpoint's config, once read (the blocks loader needs it)

    def build(self) -> CausalLM:
        from treespec.weights.loader import load_checkpoint
        ckpt = load_checkpoint(str(self.path))
        self.hf_config = ckpt.config
        return build_model(ckpt.config, ckpt.tensors)

    def quantize(self, model: CausalLM) -> None:
        if self.weight_quantization is WeightQuantization.BLOCKS:
            use_gguf_blocks(model, self.path, self.hf_config)
        elif self.weight_quantization is not WeightQuantization.NONE:
            from treespec.models.quant import quantize_linears
            quantize_linears(model, self.weight_quantization)


@dataclass
class TensorsSource:
    """An HF config dict and HF-named tensors in memory (tests, callers holding a state dict); fp32 only."""
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    weight_quantization: WeightQuantization = WeightQuantization.NONE

    def build(self) -> CausalLM:
        return build_model(self.config, self.tensors)

    def quantize(self, model: CausalLM) -> None:
        pass


def use_gguf_blocks(target: torch.nn.Module, path: Path, config: dict[str, Any]) -> None:
    """weight_quantization 'blocks': the GGUF's block-quantized projections and Q8_0 head computed from their
    blocks (exact); everything else (F32/F16 tensors, types without a kernel, no kernel here) stays fp32."""
    from treespec.models.quant_blocks import use_blocks, use_head_blocks
    from treespec.weights.gguf_blocks import load_gguf_blocks, load_head_blocks
    from treespec.weights.gguf_file import read_gguf
    gguf = read_gguf(path)
    swapped = use_blocks(target, load_gguf_blocks(gguf, config))
    head = target.lm_head is not None and use_head_blocks(target, load_head_blocks(gguf))  # None: a TP worker
    log.info("weight_quantization blocks: %d projections %s; greedy head %s", swapped,
             "from their blocks" if swapped else "(none: fp32 Linears)",
             "from its Q8_0 blocks for few rows" if head else "as in fp32 mode")
