"""How the target is split: the parallel sizes, the checks they need, and this rank's shard of a built model."""
from __future__ import annotations

from dataclasses import dataclass

from treespec.config import EngineConfig, WeightQuantization
from treespec.distributed.pipeline import PipelineStage, stage_layers
from treespec.distributed.source import ModelSource
from treespec.distributed.step import Shard
from treespec.distributed.tensor_parallel import TensorParallelShard, check_tensor_parallel, split_tensor_parallel
from treespec.errors import ConfigError
from treespec.models.base import CausalLM
from treespec.models.config import ModelConfig


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

    def check(self, model: ModelConfig, weight_quantization: WeightQuantization) -> None:
        """ConfigError before any process starts if this model cannot be split this way."""
        if self.tensor_parallel_size > 1:
            check_tensor_parallel(model, self.tensor_parallel_size)
            if weight_quantization is WeightQuantization.BLOCKS:
                raise ConfigError("weight_quantization: 'blocks' is not supported with tensor_parallel_size > 1 "
                                  "(the quantized blocks are not split yet); use 'none', 'fp16' or 'int8', or "
                                  "pipeline_parallel_size, which keeps whole layers")
        else:
            stage_layers(model.num_layers, self.pipeline_parallel_size)

    def shard(self, model: CausalLM, rank: int, source: ModelSource) -> Shard:
        """Keep rank `rank`'s part of the full model, in the weight format it runs in."""
        if self.tensor_parallel_size > 1:
            split_tensor_parallel(model, rank, self.tensor_parallel_size)
            source.quantize(model)  # after the split: each shard quantizes its own rows
            return TensorParallelShard(model)
        source.quantize(model)  # before the split: whole layers, as one process has them
        stages = self.pipeline_parallel_size
        return PipelineStage(model, rank, stages, self.micro_batches or stages)
