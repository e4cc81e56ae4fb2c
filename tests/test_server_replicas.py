"""`treespec serve --data-parallel-size 2`: two engine replicas on a local Ray cluster behind one endpoint, answered
by the official openai client; /metrics sums the replicas; 429 once both are full; SIGTERM lets in-flight streams
finish and leaves no process behind (Ray's included)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serving_tiny import save_tiny_model_dir
from test_server_cli import KEY, free_port, in_engine, start_streams

from treespec.cli import main
from treespec.engine.async_engine import EngineSnapshot, RequestDelta
from treespec.engine.engine import StepStats
from treespec.engine.request import FinishReason
from treespec.errors import EngineClosedError, QueueFullError
from treespec.sampling import SamplingParams

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'distributed' extra"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray Serve's own pydantic use


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, name) of every live (non-zombie) process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), name)
    return table


def descendants(pid: int) -> dict[int, str]:
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _sid, name) in table.items():
            if ppid == parent and child not in found:
                found[child] = name
                frontier.append(child)
    return found


def in_session(sid: int) -> dict[int, str]:
    return {pid: name for pid, (_ppid, s, name) in process_table().items() if s == sid}


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


LONG = 2000  # tokens: a few seconds of the tiny model, long enough to hold both replicas busy


def wait_ready(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the replicas did not become ready"
        time.sleep(0.5)



def sigterm_drains(proc: subprocess.Popen, threads: list, results: list, tokens: int) -> None:
    """SIGTERM with streams in flight: every stream finishes in full, the server exits 0, and nothing is left in
    its session."""
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert proc.wait(120) == 0, proc.stdout.read()
    for events in results:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == tokens
    time.sleep(1.5)  # (a killed process may take a moment to leave /proc; a worker notices its replica is gone)
    assert in_session(proc.pid) == {}

def test_two_replicas_behind_one_endpoint_drain_on_sigterm_and_leave_no_process(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    config = json.loads((model / "config.json").read_text())  # (rotary positions: any length works)
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": LONG + 64}))
    port, base = free_port(), ""
    # --max-num-seqs 1 --max-waiting 0: each replica holds one request, so two at once need both replicas
    proc = subprocess.Popen(
        [sys.executable, "-m", "treespec.cli", "serve", "--model", str(model), "--port", str(port),
         "--served-model-name", "tiny", "--data-parallel-size", "2", "--threads", "1", "--max-num-seqs", "1",
         "--max-waiting", "0", "--drain-timeout", "60"],
        env={**os.environ, "TREESPEC_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own session: what is left of it after exit is an orphan
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(proc, base)
        assert httpx.get(f"{base}/v1/models").status_code == 401

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
                "temperature": 0}
        whole = client.chat.completions.create(**chat)
        streamed = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True)
                    if c.choices]
        assert whole.usage.completion_tokens == 8 and whole.choices[0].message.content
        assert "".join(streamed) == whole.choices[0].message.content  # greedy: either replica gives the same text
        assert metric(base, "treespec:generation_tokens_total") == 16  # both requests, on whichever replica
        assert metric(base, 'treespec:request_success_total') == 2

        threads, results = start_streams(base, 2, LONG)  # returns once /metrics counts 2 in the engines
        assert in_engine(base) == 2  # one per replica: the gauges are summed
        with pytest.raises(openai.RateLimitError):  # both replicas full
            client.completions.create(model="tiny", prompt="hi", max_tokens=4)
        ray_processes = descendants(proc.pid)
        assert {"raylet", "gcs_server"} <= set(ray_processes.values()), ray_processes

        sigterm_drains(proc, threads, results, LONG)
        assert {pid: name for pid, name in ray_processes.items() if pid in process_table()} == {}
    finally:
        if in_session(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_more_replicas_than_cpus_needless_ray_flags_and_other_backends_are_usage_errors(capsys, monkeypatch):
    """A local cluster gets this machine's CPUs; replicas (and their ranks) that cannot all be placed are refused
    before starting."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    for flags in (["--data-parallel-size", str(cpus + 1)],
                  ["--data-parallel-size", "2", "--tensor-parallel-size", str(cpus), "--threads", "1"],
                  ["--data-parallel-size", "2", "--tensor-parallel-size", "2", "--cpus-per-rank", str(cpus)]):
        assert main(["serve", *flags, "--port", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--data-parallel-size" in err[0] and "CPUs" in err[0], err
    assert main(["serve", "--ray-address", "auto", "--port", "0"]) == 2  # only the replicas use Ray
    assert capsys.readouterr().err.strip() == "treespec: error: --ray-address: only used with --data-parallel-size > 1"
    assert main(["serve", "--cpus-per-rank", "0.5", "--port", "0"]) == 2
    assert "--cpus-per-rank: only used with --data-parallel-size > 1" in capsys.readouterr().err
    assert main(["serve", "--data-parallel-size", "2", "-tp", "2", "--distributed-executor-backend", "ray",
                 "--port", "0"]) == 2  # a replica spawns its own ranks
    assert "--distributed-executor-backend mp" in capsys.readouterr().err


def test_placement_reserves_one_bundle_per_rank_on_one_node():
    from treespec.server.replicas.cluster import Placement
    one = Placement.fit(2, 1, None, None, cpus=8)
    assert (one.threads, one.cpus_per_rank) == (4, 4) and one.deployment_options() == {
        "ray_actor_options": {"num_cpus": 4}}
    group = Placement.fit(2, 2, 1, 0.5, cpus=2)  # 2 replicas x 2 ranks on 2 cores: oversubscribed on purpose
    assert group.deployment_options() == {"ray_actor_options": {"num_cpus": 0.5},
                                          "placement_group_bundles": [{"CPU": 0.5}, {"CPU": 0.5}],
                                          "placement_group_strategy": "STRICT_PACK"}
    assert Placement.fit(2, 2, None, None, cpus=8).threads == 2  # default: an even share per rank


def test_snapshots_are_summed_field_by_field_and_position_by_position():
    from treespec.server.replicas.pool import sum_snapshots
    a = EngineSnapshot(1, 2, StepStats(num_steps=3, num_drafts=1, num_draft_tokens=4, num_accepted_tokens=2,
                                       accepted_per_position=[1, 1], num_prompt_tokens=5, num_generation_tokens=6),
                       {FinishReason.LENGTH: 1})
    b = EngineSnapshot(0, 1, StepStats(num_steps=1, accepted_per_position=[2, 0, 1], num_generation_tokens=1),
                       {FinishReason.LENGTH: 2, FinishReason.ABORT: 1})
    total = sum_snapshots([a, b])
    assert (total.num_running, total.num_waiting) == (1, 3)
    assert total.stats == StepStats(num_steps=4, num_drafts=1, num_draft_tokens=4, num_accepted_tokens=2,
                                    accepted_per_position=[3, 1, 1], num_prompt_tokens=5, num_generation_tokens=7)
    assert total.finished == {FinishReason.LENGTH: 3, FinishReason.ABORT: 1}
    assert a.stats.accepted_per_position == [1, 1]  # the replicas' snapshots are left as they were
    assert sum_snapshots([]) == EngineSnapshot()


class FakeReplicaCall:
    """Stands in for Ray Serve's DeploymentResponseGenerator: yields the items given (raising any exception among
    them), then waits until cancelled, like a replica still generating."""

    def __init__(self, items: list) -> None:
        self.items, self.cancelled = list(items), False
        self._wake = asyncio.Event()

    async def __anext__(self):
        from ray.serve.exceptions import RequestCancelledError
        if self.items:
            item = self.items.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item
        await self._wake.wait()
        raise RequestCancelledError("cancelled")

    def cancel(self) -> None:
        self.cancelled = True
        self._wake.set()


class FakeHandle:
    def __init__(self, calls: list[FakeReplicaCall]) -> None:
        self.calls = calls

    def options(self, stream: bool) -> "FakeHandle":
        return self

    @property
    def generate(self) -> "FakeHandle":
        return self

    def remote(self, *args) -> FakeReplicaCall:
        return self.calls.pop(0)


def delta(index: int, text: str, finish: bool = False) -> RequestDelta:
    return RequestDelta(index, text, [1], 0.0, FinishReason.LENGTH if finish else None)


def test_pool_gates_on_capacity_and_ends_streams_on_abort_and_on_a_dead_replica():
    from ray.exceptions import RayError

    from treespec.server.replicas.pool import ReplicaPool

    async def scenario() -> None:
        dying = FakeReplicaCall([None, delta(0, "a"), RayError("the replica's process died")])
        draining = FakeReplicaCall([None, delta(0, "b"), delta(1, "c", finish=True)])
        pool = ReplicaPool(FakeHandle([dying, draining]), None, 100, num_replicas=1, replica_capacity=3)
        first = await pool.submit([1], SamplingParams(max_tokens=4), "r1", True)
        second = await pool.submit([1], SamplingParams(max_tokens=4, n=2), "r2", True)
        with pytest.raises(QueueFullError):  # 1 + 2 choices in flight fill the one replica
            await pool.submit([1], SamplingParams(max_tokens=4), "r3", True)
        got = [d async for d in first]
        assert [d.text for d in got] == ["a", ""] and got[-1].finish_reason is FinishReason.ERROR
        assert "the replica's process died" in got[-1].error and dying.cancelled
        assert [(await second.__anext__()).text, (await second.__anext__()).text] == ["b", "c"]  # choice 1 done
        await pool.shutdown(drain_timeout=0.05)  # choice 0 still runs at the deadline
        rest = [d async for d in second]
        assert [(d.index, d.finish_reason) for d in rest] == [(0, FinishReason.ABORT)] and draining.cancelled
        with pytest.raises(EngineClosedError):
            await pool.submit([1], SamplingParams(max_tokens=4), "r4", True)

    asyncio.run(scenario())
