"""The target as rank 0's engine sees it: a CausalLM-shaped front over rank 0's shard that runs every forward on
all ranks. The engine, the cost model and the drafters use it as they use a CausalLM (config, lm_head,
embed_tokens, logits, new_cache, forward); only the drafters that run the target's own layers (layer_skip) cannot.
"""
from __future__ import annotations

import threading
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
from torch import nn

from treespec.attention.metadata import SeqAttention
from treespec.distributed.group import first_line, leave
from treespec.distributed.step import CacheJournal, MirroredKVCache, Shard, StepInputs
from treespec.errors import ConfigError, DistributedError
from treespec.models.base import CausalLM
from treespec.models.lm_head import LMHead

_JOIN_S = 10.0  # seconds workers get to exit after rank 0's stop before they are terminated


class Workers(Protocol):
    """The other ranks, as far as rank 0 can see them (processes it spawned, Ray actors, or nothing: torchrun)."""

    def dead(self) -> list[str]:
        """'rank r (exit code c)' for every rank known to have exited."""

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the ranks to exit after rank 0's stop, then end them."""


class ParallelTarget(nn.Module):
    def __init__(self, shard: Shard, local: CausalLM, control: dist.ProcessGroup, workers: Workers,
                 name: str, rank_weights: list[str]) -> None:
        super().__init__()
        self.local, self.shard, self.control, self.workers, self.name = local, shard, control, workers, name
        self.rank_weights = rank_weights  # how each rank's projections run (plan.describe_weights), by rank
        self.config = local.config
        self.journal = CacheJournal()
        self.failure: str | None = None
        self._lock = threading.Lock()  # one forward (or the shutdown) on the group at a time
        self._closed = False

    @property
    def lm_head(self) -> LMHead:
        return self.local.lm_head

    @property
    def device(self) -> torch.device:
        return self.local.device  # the ranks run on the CPU (api.py refuses other placements under TP/PP)

    @property
    def embed_tokens(self) -> nn.Module:
        return self.local.embed_tokens

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [T, D] -> [T, V] fp32
        return self.local.logits(hidden)

    def new_cache(self, max_len: int) -> MirroredKVCache:
        return MirroredKVCache(self.journal, *self.shard.cache_layout, max_len)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention],
                blocks: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """Final-normed hidden states [T, D]: rank 0 sends the step's inputs, every rank runs its shard."""
        if blocks is not None:
            raise ConfigError(f"a {self.name} target runs all of its layers (no layer_skip drafting)")
        with self._lock:
            if self.failure is not None or self._closed:
                raise DistributedError(self.failure or f"the {self.name} group is shut down")
            inputs = StepInputs.from_forward(self.journal, tokens, positions, seqs)
            try:
                dist.broadcast_object_list([inputs], src=0, group=self.control)
                return self.shard.run(inputs, seqs)
            except Exception as e:  # noqa: BLE001 - the ranks are out of step now: every later forward fails too
                dead = self.workers.dead()
                self.failure = (f"{self.name} " + ", ".join(dead) + " died" if dead
                                else f"{self.name} group failed: {first_line(e)}") + "; restart treespec"
                raise DistributedError(self.failure) from None

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them, leave the group (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.failure is None:
                try:
                    dist.broadcast_object_list([None], src=0, group=self.control)
                except Exception:  # noqa: BLE001 - a dead group: stop() ends what is left
                    pass
            self.workers.stop(_JOIN_S)
            leave()
