"""ReplicaPool: the app's EngineClient for K engine replicas behind a Ray Serve deployment handle.

Replica choice is Ray Serve's: of two replicas (all of them when K = 2) the one with fewer requests in flight,
counted by this process's router, which sees every request since all traffic enters through this endpoint.
Each replica takes at most max_num_seqs + max_waiting requests (its deployment's max_ongoing_requests), so
none is sent more than its engine holds; the pool answers QueueFullError (429) itself once the choices in
flight fill all K, rather than letting Ray queue them unseen. A replica may still refuse a request (its KV
budget, or n choices it has no room for): that QueueFullError comes back as it was raised.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from typing import Any, Callable

from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RequestCancelledError

from treespec.engine.async_engine import EngineSnapshot, RequestDelta
from treespec.engine.engine import StepStats
from treespec.engine.request import FinishReason
from treespec.errors import EngineClosedError, QueueFullError, TreespecError
from treespec.sampling import SamplingParams


def describe(error: BaseException) -> str:
    """One line for a Ray error (their messages run to pages: tracebacks, memory reports)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def sum_snapshots(snapshots: list[EngineSnapshot]) -> EngineSnapshot:
    """Gauges, counters and per-position counts added over replicas (a shorter list counts as zeros beyond)."""
    total = EngineSnapshot()
    for s in snapshots:
        total.num_running += s.num_running
        total.num_waiting += s.num_waiting
        for f in dataclasses.fields(StepStats):
            mine, theirs = getattr(total.stats, f.name), getattr(s.stats, f.name)
            if isinstance(mine, list):
                mine.extend([0] * (len(theirs) - len(mine)))
                for i, v in enumerate(theirs):
                    mine[i] += v
            else:
                setattr(total.stats, f.name, mine + theirs)
        for reason, count in s.finished.items():
            total.finished[reason] = total.finished.get(reason, 0) + count
    return total


class ReplicaStream:
    """The deltas of one request from the replica that took it; a DeltaStream like AsyncEngine's RequestStream.

    close() cancels the replica's generator (the replica aborts the request). abort() also ends each unfinished
    choice here with finish_reason "abort", as one engine's shutdown does, so streams still end with [DONE].
    A replica that dies ends the unfinished choices with finish_reason "error" and says so.
    """

    def __init__(self, generator: Any, n: int, on_end: Callable[["ReplicaStream"], None]) -> None:
        self._generator, self._on_end = generator, on_end  # generator: DeploymentResponseGenerator
        self.n = n
        self._unfinished = set(range(n))
        self._endings: deque[RequestDelta] = deque()  # abort / error deltas made here, sent before anything else

    def __aiter__(self) -> "ReplicaStream":
        return self

    async def __anext__(self) -> RequestDelta:
        if self._endings:
            return self._endings.popleft()
        if not self._unfinished:
            raise StopAsyncIteration
        try:
            delta = await self._generator.__anext__()
        except (RequestCancelledError, StopAsyncIteration):  # closed here (or the replica ended early)
            if self._endings:
                return self._endings.popleft()
            self._end()
            raise StopAsyncIteration from None
        except RayError as e:
            self._end_all(FinishReason.ERROR, f"replica failed: {describe(e)}")
            return self._endings.popleft()
        if delta.finish_reason is not None:
            # (a choice that finished while abort() was ending it keeps its real end)
            self._endings = deque(d for d in self._endings if d.index != delta.index)
            self._unfinished.discard(delta.index)
            if not self._unfinished:
                self._end()
        return delta

    def close(self) -> None:
        if self._unfinished:
            self._generator.cancel()
            self._end()

    def abort(self) -> None:
        """End every unfinished choice with finish_reason "abort" (the drain deadline passed)."""
        self._end_all(FinishReason.ABORT, None)

    def _end_all(self, reason: FinishReason, error: str | None) -> None:
        now = time.monotonic()
        self._endings.extend(RequestDelta(i, "", [], now, reason, error) for i in sorted(self._unfinished))
        self.close()

    def _end(self) -> None:
        self._unfinished.clear()
        self._on_end(self)


class ReplicaPool:
    def __init__(self, handle: Any, board: Any, max_model_len: int, num_replicas: int, replica_capacity: int) -> None:
        self._generate = handle.options(stream=True).generate  # handle: DeploymentHandle[EngineReplica]
        self._board = board  # ActorHandle[SnapshotBoard]
        self._max_model_len = max_model_len
        self._replica_capacity, self._capacity = replica_capacity, num_replicas * replica_capacity
        self._streams: set[ReplicaStream] = set()
        self._in_flight = 0  # choices submitted and not finished, over all replicas
        self._snapshot = EngineSnapshot()
        self._closed = False

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    async def refresh_snapshot(self) -> None:
        self._snapshot = sum_snapshots(await self._board.snapshots.remote())

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     speculate: bool = True) -> ReplicaStream:
        if self._closed:
            raise EngineClosedError("the server is shutting down")
        if params.n <= self._replica_capacity and self._in_flight + params.n > self._capacity:
            raise QueueFullError(f"all replicas are full ({self._capacity} requests running or waiting)")
        self._in_flight += params.n
        generator = self._generate.remote(prompt_ids, params, request_id, speculate)
        try:
            await generator.__anext__()  # None: the replica's engine took it
        except BaseException as e:
            self._in_flight -= params.n
            generator.cancel()  # (a no-op once the replica raised; the client went away otherwise)
            cause = e.cause if isinstance(e, RayTaskError) else e
            if isinstance(cause, TreespecError):  # ConfigError, QueueFullError, ...: as the engine raised it
                raise cause from None
            if isinstance(cause, RayError):  # no replica to take it (died, killed for memory, ...)
                raise EngineClosedError(f"no replica could take the request: {describe(cause)}") from None
            raise
        stream = ReplicaStream(generator, params.n, self._ended)
        self._streams.add(stream)
        return stream

    def _ended(self, stream: ReplicaStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
            self._in_flight -= stream.n

    async def shutdown(self, drain_timeout: float) -> None:
        """Refuse new requests, let running ones finish for drain_timeout seconds, end the rest with "abort"."""
        self._closed = True
        deadline = time.monotonic() + drain_timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for stream in list(self._streams):
            stream.abort()
