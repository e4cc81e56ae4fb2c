"""AsyncEngine: submit, stream and abort requests from asyncio while one thread owns the LLMEngine.

LLMEngine is not thread-safe, so exactly one background thread touches it. The event loop posts commands
(add, abort) to that thread's queue; the thread runs them between steps, steps while any request is
unfinished, and hands each request's new text and token ids to the asyncio queue of the stream that
asked for it. A request that fails (a failed forward, or an exception out of step()) ends with
FinishReason.ERROR on its own stream; the engine keeps serving the rest of the queue.
"""
from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from treespec.engine.emit import stream_delta
from treespec.engine.engine import LLMEngine, StepStats
from treespec.engine.request import FinishReason, Request
from treespec.errors import ConfigError, EngineClosedError
from treespec.sampling import SamplingParams


@dataclass
class RequestDelta:
    """What one step added to one choice. The last delta of a choice has finish_reason set."""
    index: int                          # which of the n choices
    text: str                           # new final text (a tail that may grow into a stop string is held back)
    token_ids: list[int]                # new token ids (a stop token id included, like vLLM)
    time: float                         # time.monotonic() when the engine thread published it
    finish_reason: FinishReason | None = None
    error: str | None = None            # set when finish_reason is ERROR
    metrics: dict | None = None         # SpecMetrics.as_dict() on the last delta


@dataclass
class EngineSnapshot:
    """Engine gauges and totals, copied on the engine thread after every step (read by /metrics)."""
    num_running: int = 0
    num_waiting: int = 0
    stats: StepStats = field(default_factory=StepStats)  # accepted_per_position included (/metrics reads it)
    finished: dict[FinishReason, int] = field(default_factory=dict)  # requests ended, by reason (aborts included)


@dataclass(eq=False)
class _Choice:
    """Engine-thread bookkeeping for one engine request."""
    request: Request
    index: int
    sink: Callable[[RequestDelta], None]
    num_sent_ids: int = 0


class RequestStream:
    """Async iterator over the deltas of the n choices of one submitted prompt; close() aborts what is left."""

    def __init__(self, engine: "AsyncEngine", request_ids: list[str],
                 deltas: asyncio.Queue[RequestDelta | None]) -> None:
        self.request_ids = request_ids
        self._engine, self._deltas = engine, deltas
        self._unfinished = set(range(len(request_ids)))

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestDelta:
        if not self._unfinished:
            raise StopAsyncIteration
        delta = await self._deltas.get()
        if delta is None:  # close() was called while we waited
            raise StopAsyncIteration
        if delta.finish_reason is not None:
            self._unfinished.discard(delta.index)
        return delta

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        """Abort every choice not finished yet (client gone, or the caller stops reading). Idempotent."""
        if not self._unfinished:
            return
        for i in sorted(self._unfinished):
            self._engine.abort(self.request_ids[i])
        self._unfinished.clear()
        self._deltas.put_nowait(None)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        # (command, its future) for the engine thread; None = stop. _lock orders posts against that stop.
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], Future] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._choices: dict[str, _Choice] = {}
        self._snapshot = EngineSnapshot()
        self._finished = {reason: 0 for reason in FinishReason}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="treespec-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side ------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.max_len

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    async def refresh_snapshot(self) -> None:
        """Nothing to fetch: the engine thread copies the snapshot after every step (replicas must ask)."""

    @property
    def num_unfinished(self) -> int:
        return len(self._choices)

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                     speculate: bool = True) -> RequestStream:
        """Queue params.n choices of one prompt, each an engine request (seed+i for choice i when seeded).

        Raises ConfigError for a request the engine cannot take (n more than the queues can ever hold at once
        included), QueueFullError when they cannot hold all n now, EngineClosedError when shutting down.
        """
        n = params.n
        if self._closed:
            raise EngineClosedError("the server is shutting down")
        if n > (cap := self.engine.scheduler.capacity(len(prompt_ids) + params.max_tokens)):
            raise ConfigError(f"n: {n} choices can never be taken together: the server holds at most {cap} "
                              f"requests this long at once (running and waiting)")
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[RequestDelta | None] = asyncio.Queue()

        def sink(delta: RequestDelta) -> None:
            try:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        ids = [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
        choice_params = [dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
                         for i in range(n)]
        done = self._call(lambda: self._add(prompt_ids, choice_params, ids, speculate, sink))
        await asyncio.wrap_future(done)
        return RequestStream(self, ids, deltas)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       speculate: bool = True) -> AsyncIterator[RequestDelta]:
        """submit() and iterate; leaving the loop early (or being cancelled) aborts the unfinished choices."""
        stream = await self.submit(prompt_ids, params, request_id, speculate)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Abort one engine request (safe from any thread; a no-op once it finished or the engine stopped)."""
        self._call(lambda: self._abort(request_id, FinishReason.ABORT, None))

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to drain_timeout seconds, abort the rest, stop."""
        self._closed = True
        deadline = time.monotonic() + drain_timeout
        while self._choices and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Abort everything and stop the engine thread (blocking)."""
        self._closed = True
        self._call(self._abort_all)
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._commands.put(None)
        self._thread.join()

    def _call(self, fn: Callable[[], None]) -> Future:
        """Run fn on the engine thread; the future carries its result or exception."""
        done: Future = Future()
        with self._lock:
            if self._stopped:
                done.set_exception(EngineClosedError("the engine has stopped"))
            else:
                self._commands.put((fn, done))
        return done

    # ---- engine thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._run_commands(block=not self.engine.has_unfinished()):
            if self.engine.has_unfinished():
                self._step()

    def _run_commands(self, block: bool) -> bool:
        """Run queued commands (waiting for one when idle); False once asked to stop."""
        while True:
            try:
                item = self._commands.get() if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            fn, done = item
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller; the engine thread carries on
                done.set_exception(e)
            else:
                done.set_result(None)
            block = False

    def _add(self, prompt_ids: list[int], params: list[SamplingParams], ids: list[str], speculate: bool,
             sink: Callable[[RequestDelta], None]) -> None:
        clash = [i for i in ids if i in self._choices]
        if clash:
            raise ConfigError(f"request_id: {clash[0]!r} is already running")
        added: list[Request] = []
        try:
            for p, rid in zip(params, ids):
                added.append(self.engine.add_request(prompt_ids, p, rid, speculate=speculate))
        except BaseException:
            for r in added:  # all n choices or none
                self.engine.abort(r.request_id)
            self._collect_aborted()
            raise
        for index, r in enumerate(added):
            self._choices[r.request_id] = _Choice(r, index, sink)
        self._update_snapshot()

    def _abort(self, request_id: str, reason: FinishReason, error: str | None) -> None:
        choice = self._choices.get(request_id)
        if choice is None:
            return
        self.engine.abort(request_id)
        self._collect_aborted()
        if error is not None:
            choice.request.finish(reason, error)
        self._publish([choice])

    def _abort_all(self) -> None:
        for rid in list(self._choices):
            self._abort(rid, FinishReason.ABORT, None)

    def _collect_aborted(self) -> None:
        # LLMEngine.abort marks the request finished and frees its cache but leaves it in the scheduler's
        # queues until the next step's end; collect it now so the next step never schedules it.
        self.engine.scheduler.collect_finished()

    def _step(self) -> None:
        try:
            updated = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the requests that were in the step, keep serving
            failed = [rid for rid, c in self._choices.items() if c.request in self.engine.scheduler.running]
            for rid in failed:
                self._abort(rid, FinishReason.ERROR, f"engine step failed: {type(e).__name__}: {e}")
            return
        self._publish([c for r in updated if (c := self._choices.get(r.request_id)) is not None and c.request is r])

    def _publish(self, choices: list[_Choice]) -> None:
        """Hand each choice its new text and ids; the snapshot is updated first, so a client that has its last
        token also sees it counted in /metrics."""
        out = [(c.sink, d) for c in choices if (d := self._delta(c)) is not None]
        self._update_snapshot()
        for sink, delta in out:
            sink(delta)

    def _delta(self, choice: _Choice) -> RequestDelta | None:
        r = choice.request
        text, ids = stream_delta(r), r.output_ids[choice.num_sent_ids:]
        choice.num_sent_ids = len(r.output_ids)
        if not (text or ids or r.finished):
            return None
        delta = RequestDelta(choice.index, text, list(ids), time.monotonic())
        if r.finished:
            delta.finish_reason = r.finish_reason or FinishReason.ABORT
            delta.error, delta.metrics = r.error, r.metrics.as_dict()
            self._finished[delta.finish_reason] += 1
            del self._choices[r.request_id]
        return delta

    def _update_snapshot(self) -> None:
        s, stats = self.engine.scheduler, self.engine.stats
        # a copy, its list included: /metrics reads it on the event loop while this thread steps on
        totals = dataclasses.replace(stats, accepted_per_position=list(stats.accepted_per_position))
        self._snapshot = EngineSnapshot(len(s.running), len(s.waiting), totals, dict(self._finished))
