"""What the app needs of an engine: one AsyncEngine in this process, or K replicas behind Ray Serve
(server/replicas/pool.py). Both hand out streams of RequestDelta and the same EngineSnapshot for /metrics."""
from __future__ import annotations

from typing import AsyncIterator, Protocol

from treespec.engine.async_engine import EngineSnapshot, RequestDelta
from treespec.sampling import SamplingParams


class DeltaStream(Protocol):
    """The deltas of the n choices of one submitted prompt; close() aborts what is left (idempotent)."""

    def __aiter__(self) -> AsyncIterator[RequestDelta]: ...

    async def __anext__(self) -> RequestDelta: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    @property
    def max_model_len(self) -> int: ...

    @property
    def snapshot(self) -> EngineSnapshot:
        """Gauges and totals as of the last refresh_snapshot() (what /metrics renders)."""
        ...

    async def refresh_snapshot(self) -> None: ...

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     speculate: bool = True) -> DeltaStream:
        """Raises ConfigError (400), QueueFullError (429) or EngineClosedError (503) before any token."""
        ...

    async def shutdown(self, drain_timeout: float) -> None:
        """Refuse new requests, let running ones finish for drain_timeout seconds, end the rest with "abort"."""
        ...
