"""What rank 0 sends every other rank per forward: the step's inputs and the KV-cache operations since the last one.

Rank 0's caches are `MirroredKVCache`s: every reserve / commit / truncate (and the cache's creation and release)
is written into a `CacheJournal`, shipped with the next forward and replayed by each worker on its own caches, so
a worker's cache of request r always has rank 0's layout (length, pending slots, positions) with its own K/V
shard. Writing K/V is not journaled: every rank writes its own during the forward.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Protocol

import torch

from treespec.attention.metadata import SeqAttention
from treespec.kv.cache import KVCache
from treespec.models.base import CausalLM


class CacheOpKind(Enum):
    NEW = "new"
    RESERVE = "reserve"
    COMMIT = "commit"
    TRUNCATE = "truncate"
    FREE = "free"


@dataclass
class CacheOp:
    kind: CacheOpKind
    cache_id: int
    arg: object = None  # NEW: max_len; RESERVE: (n, positions [n] | None); COMMIT: keep | None; TRUNCATE: length


@dataclass
class CacheJournal:
    """Cache operations made on rank 0 since the last forward."""
    ops: list[CacheOp] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    def record(self, kind: CacheOpKind, cache_id: int, arg: object = None) -> None:
        self.ops.append(CacheOp(kind, cache_id, arg))

    def drain(self) -> list[CacheOp]:
        ops, self.ops = self.ops, []
        return ops

    def new_id(self) -> int:
        return next(self._ids)


class MirroredKVCache(KVCache):
    """Rank 0's cache of one request (its own K/V shard); its layout changes are journaled for the workers."""

    def __init__(self, journal: CacheJournal, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_len: int) -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, max_len)
        self.journal, self.cache_id = journal, journal.new_id()
        journal.record(CacheOpKind.NEW, self.cache_id, max_len)
        weakref.finalize(self, journal.record, CacheOpKind.FREE, self.cache_id)  # the engine drops it: free theirs

    def reserve(self, n: int, positions: torch.Tensor | None = None) -> None:
        super().reserve(n, positions)  # raises before journaling when it does not fit
        self.journal.record(CacheOpKind.RESERVE, self.cache_id, (n, None if positions is None else positions.clone()))

    def commit(self, keep: torch.Tensor | list[int] | None = None) -> None:
        super().commit(keep)
        self.journal.record(CacheOpKind.COMMIT, self.cache_id,
                            None if keep is None else torch.as_tensor(keep, dtype=torch.long).clone())

    def truncate(self, length: int) -> None:
        super().truncate(length)
        self.journal.record(CacheOpKind.TRUNCATE, self.cache_id, length)


def replay(ops: list[CacheOp], caches: dict[int, KVCache], new_cache: Callable[[int], KVCache]) -> None:
    """Apply rank 0's journaled operations to this rank's caches (new_cache(max_len) makes one)."""
    for op in ops:
        if op.kind is CacheOpKind.NEW:
            caches[op.cache_id] = new_cache(op.arg)
        elif op.kind is CacheOpKind.FREE:
            caches.pop(op.cache_id, None)
        elif op.kind is CacheOpKind.RESERVE:
            caches[op.cache_id].reserve(*op.arg)
        elif op.kind is CacheOpKind.COMMIT:
            caches[op.cache_id].commit(op.arg)
        else:
            caches[op.cache_id].truncate(op.arg)


@dataclass
class SeqInput:
    """One request's part of a forward, as SeqAttention says it, with its cache named by id."""
    cache_id: int
    start: int
    n: int
    tree_mask: torch.Tensor | None  # [n, pending] bool


@dataclass
class StepInputs:
    """Everything a worker needs to run its shard of one forward."""
    ops: list[CacheOp]
    tokens: torch.Tensor      # [T]
    positions: torch.Tensor   # [T]
    seqs: list[SeqInput]

    @classmethod
    def from_forward(cls, journal: CacheJournal, tokens: torch.Tensor, positions: torch.Tensor,
                     seqs: list[SeqAttention]) -> "StepInputs":
        return cls(journal.drain(), tokens, positions,
                   [SeqInput(_mirrored(s.cache).cache_id, s.start, s.n, s.tree_mask) for s in seqs])

    def attention(self, caches: dict[int, KVCache]) -> list[SeqAttention]:
        return [SeqAttention(caches[s.cache_id], s.start, s.n, s.tree_mask) for s in self.seqs]


def _mirrored(cache: KVCache) -> MirroredKVCache:
    if not isinstance(cache, MirroredKVCache):
        raise TypeError("a distributed target runs only on caches it made (new_cache)")
    return cache


class Shard(Protocol):
    """One rank's part of the target: tensor_parallel.TensorParallelShard or pipeline.PipelineStage."""
    cache_layout: tuple[int, int, int]  # this rank's KV cache: (layers, K/V heads, head_dim)
    model: CausalLM                     # this rank's part of the target

    def run(self, inputs: StepInputs, seqs: list[SeqAttention]) -> torch.Tensor | None:
        """This rank's part of the forward; on rank 0 the final hidden states [T, D]."""
