"""AsyncEngine: streams equal the engine's own output, n forks, aborts free everything, failures stay local."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from serving_tiny import tiny_engine, tiny_tokenizer

from treespec.engine.async_engine import AsyncEngine, RequestDelta
from treespec.engine.request import FinishReason
from treespec.errors import ConfigError, EngineClosedError, QueueFullError
from treespec.sampling import SamplingParams

PROMPTS = ["the quick brown fox", "hello world", "a server streams tokens", "speculative decoding"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def offline(tok, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str]:
    """The obvious twin: the engine stepped by hand, one request alone."""
    engine = tiny_engine(tok)
    with torch.inference_mode():
        r = engine.add_request(prompt_ids, params)
        while engine.has_unfinished():
            engine.step()
    return r.output_ids, r.text


async def collect(stream) -> dict[int, list[RequestDelta]]:
    out: dict[int, list[RequestDelta]] = {}
    async for d in stream:
        out.setdefault(d.index, []).append(d)
    return out


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


@pytest.mark.parametrize("spec", [None, {"method": "ngram", "budget": 6}])
def test_concurrent_streams_equal_offline_runs(tok, spec):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ids = [tok.encode(p) for p in PROMPTS]
    async def main():
        engine = AsyncEngine(tiny_engine(tok, spec=spec))
        try:
            streams = [await engine.submit(p, params, f"r{i}") for i, p in enumerate(ids)]
            return await asyncio.gather(*(collect(s) for s in streams))
        finally:
            await engine.shutdown(0)
    results = run(main())
    for p, res in zip(ids, results):
        deltas = res[0]
        want_ids, want_text = offline(tok, p, params)
        assert [t for d in deltas for t in d.token_ids] == want_ids
        assert "".join(d.text for d in deltas) == want_text
        assert deltas[-1].finish_reason is FinishReason.LENGTH and deltas[-1].metrics["num_generated_tokens"] == 12
        assert all(d.finish_reason is None for d in deltas[:-1])


def test_n_choices_fork_with_seed_plus_index(tok):
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    prompt = tok.encode(PROMPTS[0])
    async def main():
        engine = AsyncEngine(tiny_engine(tok))
        try:
            return await collect(await engine.submit(prompt, params, "fork"))
        finally:
            await engine.shutdown(0)
    res = run(main())
    assert sorted(res) == [0, 1, 2]
    outputs = [[t for d in res[i] for t in d.token_ids] for i in range(3)]
    for i in range(3):
        alone = dataclasses.replace(params, n=1, seed=11 + i)
        assert outputs[i] == offline(tok, prompt, alone)[0]
    assert len({tuple(o) for o in outputs}) > 1  # different seeds, different samples


def test_abort_mid_stream_frees_the_engine(tok):
    async def main():
        engine = AsyncEngine(tiny_engine(tok, max_num_seqs=1))
        try:
            params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            running = await engine.submit(tok.encode(PROMPTS[0]), params, "a")
            waiting = await engine.submit(tok.encode(PROMPTS[1]), params, "b")
            first = await running.__anext__()
            assert first.token_ids
            running.close()
            waiting.close()
            assert [d async for d in running] == []  # closed streams end at once
            for _ in range(200):
                if engine.num_unfinished == 0 and not engine.engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            assert engine.num_unfinished == 0 and not engine.engine.has_unfinished()
            assert engine.snapshot.num_running == 0 and engine.snapshot.num_waiting == 0
            after = await collect(await engine.submit(tok.encode(PROMPTS[2]), dataclasses.replace(params, max_tokens=4),
                                                      "c"))
            assert after[0][-1].finish_reason is FinishReason.LENGTH
        finally:
            await engine.shutdown(0)
    run(main())


def test_queue_full_refuses_all_n_or_none(tok):
    async def main():
        engine = AsyncEngine(tiny_engine(tok, max_num_seqs=1, max_waiting=2))
        try:
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            first = await engine.submit(tok.encode(PROMPTS[0]), long, "a")
            await first.__anext__()  # running now; the waiting queue is empty
            second = await engine.submit(tok.encode(PROMPTS[1]), long, "b")
            with pytest.raises(QueueFullError):
                await engine.submit(tok.encode(PROMPTS[2]), dataclasses.replace(long, n=2), "c")
            assert engine.snapshot.num_waiting == 1  # the first of the two choices was taken back
            with pytest.raises(ConfigError):
                await engine.submit(tok.encode(PROMPTS[2]), long, "b")  # id already running
            first.close()
            second.close()
        finally:
            await engine.shutdown(0)
    run(main())


def test_step_failure_fails_running_requests_and_engine_carries_on(tok, monkeypatch):
    async def main():
        engine = AsyncEngine(tiny_engine(tok))
        real_step, calls = engine.engine.step, []

        def flaky_step():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return real_step()
        monkeypatch.setattr(engine.engine, "step", flaky_step)
        try:
            params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            failed = await collect(await engine.submit(tok.encode(PROMPTS[0]), params, "x"))
            last = failed[0][-1]
            assert last.finish_reason is FinishReason.ERROR and "boom" in last.error
            ok = await collect(await engine.submit(tok.encode(PROMPTS[1]), params, "y"))
            assert ok[0][-1].finish_reason is FinishReason.LENGTH
            assert sum(len(d.token_ids) for d in ok[0]) == 10
        finally:
            await engine.shutdown(0)
    run(main())


def test_shutdown_drains_then_refuses(tok):
    async def main():
        engine = AsyncEngine(tiny_engine(tok))
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        stream = await engine.submit(tok.encode(PROMPTS[0]), params, "a")
        reader = asyncio.create_task(collect(stream))
        await engine.shutdown(drain_timeout=30)
        res = await reader
        assert res[0][-1].finish_reason is FinishReason.LENGTH
        assert sum(len(d.token_ids) for d in res[0]) == 20
        with pytest.raises(EngineClosedError):
            await engine.submit(tok.encode(PROMPTS[1]), params, "b")
    run(main())


def test_shutdown_timeout_aborts_what_is_left(tok):
    async def main():
        engine = AsyncEngine(tiny_engine(tok))
        params = SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True)
        stream = await engine.submit(tok.encode(PROMPTS[0]), params, "a")
        reader = asyncio.create_task(collect(stream))
        await engine.shutdown(drain_timeout=0)
        res = await reader
        assert res[0][-1].finish_reason is FinishReason.ABORT
        assert not engine.engine.has_unfinished()
    run(main())
