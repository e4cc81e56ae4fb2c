"""`treespec serve --data-parallel-size 2 --tensor-parallel-size 2`: two Ray Serve replicas, each a tensor-parallel
group of two ranks (the replica's actor and one spawned worker), behind one endpoint, on a 2-core machine
(--cpus-per-rank 0.5). Answered by the official openai client with a one-process engine's greedy text; SIGTERM
lets in-flight streams finish and leaves no process behind: replicas, their worker ranks and Ray's own. A worker rank
killed in one replica fails that replica's requests with a clear error while the other keeps serving, until Ray
Serve's health check replaces the broken replica with a fresh group."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from serving_tiny import save_tiny_model_dir
from test_server_cli import KEY, free_port, in_engine, stream_all
from test_server_replicas import descendants, in_session, process_table, sigterm_drains, wait_ready

from treespec.api import LLM
from treespec.sampling import SamplingParams

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'distributed' extra"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray Serve's own pydantic use

IN_FLIGHT = 200  # tokens each of the two streams still generates when SIGTERM comes (a few seconds here)


def worker_ranks(pid: int) -> list[int]:
    """The spawned tensor-parallel worker ranks among pid's descendants."""
    found = []
    for child in descendants(pid):
        try:
            if "treespec.distributed.worker" in Path(f"/proc/{child}/cmdline").read_text():
                found.append(child)
        except OSError:
            continue
    return found


def streams_on_both_replicas(base: str, max_tokens: int) -> tuple[list[threading.Thread], list]:
    """Two streaming requests in flight at once, one per replica (--max-num-seqs 1 --max-waiting 0). Retried while
    a replica still loads: Ray Serve then holds the second request until the first replica is free."""
    deadline = time.monotonic() + 180
    while True:
        results: list = [None, None]
        threads = [threading.Thread(target=stream_all, args=(base, results, i, max_tokens)) for i in range(2)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if in_engine(base) == 2:
                return threads, results
            time.sleep(0.02)
        assert time.monotonic() < deadline, "two requests never ran at once"


def test_replicas_of_tensor_parallel_groups_answer_like_one_process_and_drain_on_sigterm(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    llm = LLM(str(model), num_threads=1)  # the oracle: one process, no parallelism
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    expected_text = llm.generate("the quick brown fox", greedy)[0].text
    expected_chat = llm.generate("hello", greedy, chat=True)[0].text
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # --max-num-seqs 1 --max-waiting 0: each replica holds one request, so two at once need both replicas
    proc = subprocess.Popen(
        [sys.executable, "-m", "treespec.cli", "serve", "--model", str(model), "--port", str(port),
         "--served-model-name", "tiny", "--data-parallel-size", "2", "--tensor-parallel-size", "2", "--threads", "1",
         "--cpus-per-rank", "0.5", "--max-num-seqs", "1", "--max-waiting", "0", "--drain-timeout", "120"],
        env={**os.environ, "TREESPEC_API_KEY": KEY}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own session: what is left of it after exit is an orphan
    try:
        wait_ready(proc, base)
        workers = worker_ranks(proc.pid)
        assert len(workers) == 2, descendants(proc.pid)  # one per replica (rank 0 is the replica's actor)

        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        for _ in range(2):  # (sequential requests: each replica likely serves one; either must give the oracle's)
            done = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=8, temperature=0)
            assert done.choices[0].text == expected_text
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
                "temperature": 0}
        whole = client.chat.completions.create(**chat)
        streamed = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True)
                    if c.choices]
        assert whole.choices[0].message.content == expected_chat == "".join(streamed)

        os.kill(workers[0], signal.SIGKILL)
        outcomes = []  # (with both replicas idle, Ray Serve picks either at random: both get some of these)
        while not ({"ok", "error"} <= set(outcomes)):
            assert len(outcomes) < 30, outcomes
            try:
                client.completions.create(model="tiny", prompt="hi", max_tokens=4)
                outcomes.append("ok")
            except openai.InternalServerError as e:
                assert "tensor-parallel rank 1 (exit code -9) died" in str(e)
                outcomes.append("error")
        deadline = time.monotonic() + 120
        while len(replaced := worker_ranks(proc.pid)) < 2:  # the health check restarts the broken replica
            assert time.monotonic() < deadline, "the broken replica was not replaced"
            time.sleep(0.5)
        assert workers[1] in replaced and workers[0] not in replaced
        workers += [pid for pid in replaced if pid != workers[1]]

        threads, results = streams_on_both_replicas(base, IN_FLIGHT)
        processes = descendants(proc.pid)
        assert {"raylet", "gcs_server"} <= set(processes.values()), processes
        sigterm_drains(proc, threads, results, IN_FLIGHT)
        live = process_table()
        assert [pid for pid in workers if pid in live] == [], "a worker rank outlived the server"
        assert {pid: name for pid, name in processes.items() if pid in live} == {}
    finally:
        if in_session(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
