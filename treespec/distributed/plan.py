"""How the target is split: the parallel sizes, the checks they need, and this rank's shard of a built model."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from treespec.config import EngineConfig, WeightQuantization
from treespec.distributed.pipeline import PipelineStage, stage_layers
from treespec.distributed.source import ModelSource
from treespec.distributed.step import Shard
from treespec.distributed.tensor_parallel import (AllReduceSum, TensorParallelShard, check_tensor_parallel,
                                                  split_tensor_parallel)
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig
from treespec.models.quant_blocks import BlockQuantLinear


@dataclass(frozen=True)
class ParallelPlan:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    micro_batches: int | None = None  # pipeline: most micro-batches a forward is cut into (None: one per stage)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "ParallelPlan":
        return cls(config.tensor_parallel_size, config.pipeline_parallel_size)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def name(self) -> str:
        return "tensor-parallel" if self.tensor_parallel_size > 1 else "pipeline-parallel"

    def check(self, model: ModelConfig) -> None:
        """ConfigError before any process starts if this model cannot be split this way."""
        if self.tensor_parallel_size > 1:
            check_tensor_parallel(model, self.tensor_parallel_size)
        else:
            stage_layers(model.num_layers, self.pipeline_parallel_size)

    def shard(self, model: CausalLM, rank: int, source: ModelSource) -> Shard:
        """Keep rank `rank`'s part of the full model, in the weight format it runs in."""
        if self.tensor_parallel_size > 1:
            if rank:
                model.lm_head = None  # rank 0 verifies: the others neither keep nor load a head
            blocks = source.weight_quantization is WeightQuantization.BLOCKS
            if blocks:
                source.quantize(model)  # whole blocks first, as one process has them; the split cuts them
            split_tensor_parallel(model, rank, self.tensor_parallel_size)
            if not blocks:
                source.quantize(model)  # fp16 / int8 after the split: each shard quantizes its own rows
            return TensorParallelShard(model)
        source.quantize(model)  # before the split: whole layers, as one process has them
        stages = self.pipeline_parallel_size
        return PipelineStage(model, rank, stages, self.micro_batches or stages)


def describe_weights(shard: Shard) -> str:
    """How this rank's decoder projections run, for the load report: 'N of M projections from their blocks'."""
    projections = [p for block in shard.model.layers
                   for p in (block.self_attn.qkv_proj, block.self_attn.o_proj, block.mlp.gate_up_proj,
                             block.mlp.down_proj)]
    from_blocks = sum(isinstance(_unwrapped(p), BlockQuantLinear) for p in projections)
    return f"{from_blocks} of {len(projections)} projections from their blocks"


def _unwrapped(projection: nn.Module) -> nn.Module:
    return projection.linear if isinstance(projection, AllReduceSum) else projection
