"""Megatron tensor parallelism: each rank holds 1/N of every layer and the layers' outputs are summed.

q/k/v and gate/up are split by output rows (column-parallel: a rank computes its heads, its MLP channels), o and
down by input columns (row-parallel: each rank's partial product, then one all-reduce each), so a layer costs two
all-reduces of [T, D]. Attention heads stay whole: rank r takes q heads [r H/N, (r+1) H/N) and the K/V heads
they read; when N exceeds the K/V heads, ranks sharing a K/V head each keep a copy (Gemma 3 270M has one).
Embedding and norms are replicated; only rank 0 holds and runs the LM head (it verifies). A row-parallel bias is
added by rank 0 only, so the sum counts it once. Projections computed from a GGUF's blocks (BlockQuantLinear) are
split the same way: their rows as a Linear's, their input columns on group boundaries. A cut inside a 16/32-weight
group (rare: a rank's heads x head_dim and MLP channels are multiples of 32 in common models) makes that one
projection fp32 from its exactly dequantized weights, logged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from treespec.attention.metadata import SeqAttention
from treespec.distributed.step import StepInputs
from treespec.errors import ConfigError
from treespec.kernels.block_layout import dequantize_packed, map_rows, slice_columns
from treespec.models.base import CausalLM
from treespec.models.layers import MLP, Attention, Linear, pack_linears, set_linear
from treespec.models.quant_blocks import BlockQuantLinear

log = logging.getLogger(__name__)
Projection = Linear | BlockQuantLinear


def check_tensor_parallel(config, size: int) -> None:
    """ConfigError unless the model's heads and MLP width split over `size` ranks (config: ModelConfig)."""
    h, kv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    if h % size or inter % size or (kv % size and size % kv):
        raise ConfigError(f"tensor_parallel_size: {size} must divide the model's {h} attention heads and "
                          f"{inter} MLP channels, and divide or be a multiple of its {kv} K/V heads")


def split_tensor_parallel(model: CausalLM, rank: int, size: int) -> None:
    """Keep rank `rank`'s shard of every layer (weights or blocks sliced; the full ones are freed). The LM head is
    left to the caller (plan.py: only rank 0 keeps it)."""
    check_tensor_parallel(model.config, size)
    for i, block in enumerate(model.layers):
        _split_attention(block.self_attn, rank, size, f"layer {i}")
        _split_mlp(block.mlp, rank, size, f"layer {i}")
    pack_linears(model)


def _split_attention(attn: Attention, rank: int, size: int, where: str) -> None:
    h, kv, hd = attn.heads, attn.kv_heads, attn.head_dim
    q_heads = range(rank * h // size, (rank + 1) * h // size)
    first_kv = rank * kv // size
    kv_heads = range(first_kv, first_kv + max(1, kv // size))  # one shared (copied) head when size > kv
    q_rows = slice(q_heads.start * hd, q_heads.stop * hd)
    k_rows = slice((h + kv_heads.start) * hd, (h + kv_heads.stop) * hd)
    v_rows = slice((h + kv + kv_heads.start) * hd, (h + kv + kv_heads.stop) * hd)
    rows = lambda t: torch.cat([t[q_rows], t[k_rows], t[v_rows]]).clone()  # noqa: E731
    attn.qkv_proj = _rows(attn.qkv_proj, rows)
    attn.o_proj = _columns(attn.o_proj, q_rows, rank, f"{where} o_proj")
    if attn.qk_norm is not None:
        w = attn.qk_norm.weight.detach()
        local = torch.cat([w[q_heads.start:q_heads.stop], w[h + kv_heads.start:h + kv_heads.stop]]).clone()
        attn.qk_norm.weight = nn.Parameter(local, requires_grad=False)
        attn.qk_norm.shape = tuple(local.shape)
    attn.heads, attn.kv_heads = len(q_heads), len(kv_heads)


def _split_mlp(mlp: MLP, rank: int, size: int, where: str) -> None:
    inter = mlp.down_proj.in_features
    cols = slice(rank * inter // size, (rank + 1) * inter // size)
    rows = lambda t: torch.cat([t[:inter][cols], t[inter:][cols]]).clone()  # noqa: E731  gate rows, up rows
    mlp.gate_up_proj = _rows(mlp.gate_up_proj, rows)
    mlp.down_proj = _columns(mlp.down_proj, cols, rank, f"{where} down_proj")


def _rows(linear: Projection, rows: Callable[[torch.Tensor], torch.Tensor]) -> Projection:
    """Column-parallel: this rank's output rows (of a weight, or of codes, scales and mins alike)."""
    bias = None if linear.bias is None else rows(linear.bias.detach())
    if isinstance(linear, BlockQuantLinear):
        return BlockQuantLinear(map_rows(linear.blocks, rows), bias)
    set_linear(linear, rows(linear.weight.detach()), bias)
    return linear


def _columns(linear: Projection, cols: slice, rank: int, name: str) -> Projection:
    """Row-parallel: this rank's input columns (blocks: cut on group boundaries, else fp32 for this one)."""
    bias = _row_parallel_bias(linear.bias, rank)
    if isinstance(linear, BlockQuantLinear):
        try:
            return BlockQuantLinear(slice_columns(linear.blocks, cols.start, cols.stop), bias)
        except ValueError as e:
            log.warning("tensor parallel: %s runs fp32 (its dequantized blocks): %s", name, e)
            linear = _dequantized(linear)
    set_linear(linear, linear.weight.detach()[:, cols].clone(), bias)
    return linear


def _dequantized(blocks: BlockQuantLinear) -> Linear:
    """The same weight as an fp32 Linear, bit for bit (dequantize_packed rounds as the kernel's weights)."""
    linear = Linear(blocks.in_features, blocks.out_features, bias=False, device="meta")
    set_linear(linear, dequantize_packed(blocks.blocks), None)
    return linear


def _row_parallel_bias(bias: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    if bias is None:
        return None
    return bias.detach().clone() if rank == 0 else torch.zeros_like(bias.detach())


class AllReduceSum(nn.Module):
    """A row-parallel projection: this rank's partial product, summed over the group by one all-reduce."""

    def __init__(self, linear: nn.Module, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in / N] -> [T, out], the same on every rank
        y = self.linear(x).contiguous()
        dist.all_reduce(y, group=self.group)
        return y


class TensorParallelShard:
    """This rank's part of a tensor-parallel forward (split_tensor_parallel done, weights in their final format)."""

    def __init__(self, model: CausalLM, group: dist.ProcessGroup | None = None) -> None:
        for block in model.layers:
            block.self_attn.o_proj = AllReduceSum(block.self_attn.o_proj, group)
            block.mlp.down_proj = AllReduceSum(block.mlp.down_proj, group)
        self.model = model
        attn = model.layers[0].self_attn
        self.cache_layout = (len(model.layers), attn.kv_heads, attn.head_dim)  # this rank's K/V heads only

    def run(self, inputs: StepInputs, seqs: list[SeqAttention]) -> torch.Tensor:
        """Final hidden states [T, D] (every rank computes them; rank 0 scores them)."""
        return self.model(inputs.tokens, inputs.positions, seqs)
