"""Inside the Ray cluster: one engine replica (a Ray Serve deployment) and the board of replica snapshots.

Ray Serve routes each call to one replica and has no broadcast, so /metrics cannot ask every replica itself:
each replica posts its EngineSnapshot to one SnapshotBoard actor instead (whenever it changed, checked every
POST_INTERVAL_S, and before it sends a request's last delta, so a client that has its last token also sees it
counted, as with one engine).
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from treespec.api import LLM
from treespec.distributed.target import ParallelTarget
from treespec.engine.async_engine import AsyncEngine, EngineSnapshot, RequestDelta
from treespec.errors import DistributedError
from treespec.sampling import SamplingParams
from treespec.tokenizer import Tokenizer

POST_INTERVAL_S = 0.1


@dataclass(frozen=True)
class ReplicaArgs:
    """What every replica builds its LLM from (the serve command's model flags)."""
    model: str
    speculative_config: dict | str | None
    max_model_len: int | None
    weight_quantization: str
    num_threads: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int
    load: dict  # cli_args.load_kwargs: tensor/pipeline-parallel sizes, device, dtype, kernels


@dataclass(frozen=True)
class ReplicaInfo:
    """What the HTTP side needs of the model: it tokenizes prompts itself, so the replicas get token ids."""
    tokenizer: Tokenizer
    max_model_len: int


class SnapshotBoard:
    """The latest EngineSnapshot of every replica, by replica id (a Ray actor; /metrics sums them)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, EngineSnapshot] = {}

    def post(self, replica_id: str, snapshot: EngineSnapshot) -> None:
        self._snapshots[replica_id] = snapshot

    def snapshots(self) -> list[EngineSnapshot]:
        return list(self._snapshots.values())


class EngineReplica:
    """One engine of the application: an LLM and its AsyncEngine (the body of the Ray Serve deployment)."""

    async def __init__(self, args: ReplicaArgs, board: Any) -> None:  # board: ActorHandle[SnapshotBoard]
        self._llm = await asyncio.to_thread(
            LLM, args.model, speculative_config=args.speculative_config, max_model_len=args.max_model_len,
            weight_quantization=args.weight_quantization, num_threads=args.num_threads,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=args.max_waiting, **args.load)
        self._engine = AsyncEngine(self._llm.engine)
        self._id, self._board = uuid.uuid4().hex, board
        self._posted: EngineSnapshot | None = None
        self._poster = asyncio.create_task(self._post_changes())

    async def info(self) -> ReplicaInfo:
        return ReplicaInfo(self._llm.tokenizer, self._engine.max_model_len)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       speculate: bool) -> AsyncIterator[RequestDelta | None]:
        """First None once the engine took the request (its errors are raised before that), then its deltas.

        A caller that cancels the call (client gone, drain deadline) aborts what is unfinished."""
        stream = await self._engine.submit(prompt_ids, params, request_id, speculate)
        try:
            yield None
            async for delta in stream:
                if stream.finished:
                    await self._post()
                yield delta
        finally:
            stream.close()

    async def _post(self) -> None:
        snapshot = self._engine.snapshot
        if snapshot is not self._posted:
            self._posted = snapshot
            await self._board.post.remote(self._id, snapshot)

    async def _post_changes(self) -> None:
        while True:
            await self._post()
            await asyncio.sleep(POST_INTERVAL_S)

    def check_health(self) -> None:
        """Ray Serve asks this periodically; raising makes it replace the replica. A tensor/pipeline-parallel
        group that lost a rank fails every later request, so the replica is unhealthy from then on."""
        target = self._llm.target
        if isinstance(target, ParallelTarget):
            dead = target.workers.dead()  # (noticed here even before a forward fails on it)
            if target.failure is not None or dead:
                raise DistributedError(target.failure or f"{target.name} {', '.join(dead)} died")

    def __del__(self) -> None:
        """Ray Serve calls this when it stops the replica: abort whatever is left, stop the engine thread and then
        the worker ranks of a parallel group (they also exit by themselves once this process is gone)."""
        self._poster.cancel()
        self._engine.close()
        self._llm.close()
