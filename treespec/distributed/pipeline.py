"""Pipeline parallelism: the layer stack split into consecutive stages, one per rank, activations sent point to point.

Stage 0 (rank 0) embeds; stage s runs its layers and sends [rows, D] to stage s + 1; the last stage applies the
final norm and sends the hidden states back to rank 0, which holds the LM head and verifies. A forward's requests
are cut into micro-batches (whole requests, about equal rows): while stage 1 runs micro-batch 0, stage 0 already
runs micro-batch 1, so with several requests in a step the stages overlap. One request is one micro-batch (its
tree's rows attend to each other), and then the stages take turns.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from treespec.attention.metadata import SeqAttention
from treespec.distributed.step import StepInputs
from treespec.errors import ConfigError
from treespec.models.base import CausalLM


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Consecutive layer ranges, sizes differing by at most one."""
    if stages > num_layers:
        raise ConfigError(f"pipeline_parallel_size: {stages} exceeds the model's {num_layers} layers")
    bounds = [s * num_layers // stages for s in range(stages + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def micro_batches(seqs: list[SeqAttention], count: int) -> list[tuple[int, int]]:
    """[first, end) request ranges: at most `count` runs of whole requests with about equal rows each."""
    total = sum(s.n for s in seqs)
    out, first, rows = [], 0, 0
    for i, s in enumerate(seqs):
        rows += s.n
        if rows * count >= total * (len(out) + 1) and i + 1 < len(seqs):
            out.append((first, i + 1))
            first = i + 1
    out.append((first, len(seqs)))
    return out


class PipelineStage:
    """This rank's stage: its layers (renumbered from 0: its own caches); embedding on the first, norm on the last."""

    def __init__(self, model: CausalLM, rank: int, size: int, micro_batches: int,
                 group: dist.ProcessGroup | None = None) -> None:
        layers = stage_layers(model.config.num_layers, size)[rank]
        model.layers = torch.nn.ModuleList(model.layers[i] for i in layers)
        for local, block in enumerate(model.layers):
            block.self_attn.layer = local
        if rank:
            model.lm_head = None  # rank 0 verifies
            model.embed_tokens = None
        self.model, self.rank, self.size, self.group = model, rank, size, group
        self.micro_batches = micro_batches
        self.hidden = model.config.hidden_size
        attn = model.layers[0].self_attn
        self.cache_layout = (len(model.layers), attn.kv_heads, attn.head_dim)  # this stage's layers only

    def run(self, inputs: StepInputs, seqs: list[SeqAttention]) -> torch.Tensor | None:
        """Run this stage on every micro-batch; rank 0 returns the final hidden states [T, D], the others None."""
        last, sends, outputs = self.size - 1, [], []
        for first, end in micro_batches(seqs, self.micro_batches):
            r0 = seqs[first].start
            r1 = seqs[end - 1].start + seqs[end - 1].n
            mb = [SeqAttention(s.cache, s.start - r0, s.n, s.tree_mask) for s in seqs[first:end]]
            if self.rank == 0:
                h = self.model.embed_tokens(inputs.tokens[r0:r1])
            else:
                h = torch.empty(r1 - r0, self.hidden)
                dist.recv(h, self.rank - 1, group=self.group)
            h = self.model.run_blocks(h, inputs.positions[r0:r1], mb)
            if self.rank == last:
                h = self.model.norm(h)
            h = h.contiguous()  # kept in `sends` until its send completes
            sends.append((h, dist.isend(h, 0 if self.rank == last else self.rank + 1, group=self.group)))
            outputs.append(r1 - r0)
        if self.rank:
            for _, work in sends:
                work.wait()
            return None
        result = [torch.empty(n, self.hidden) for n in outputs]
        for h in result:
            dist.recv(h, last, group=self.group)
        for _, work in sends:
            work.wait()
        return torch.cat(result)
