"""`treespec serve --tensor-parallel-size 2` as a real process: answered by the official openai client (chat and
streaming), SIGTERM drains in-flight requests, and no worker process outlives the server."""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import openai
import pytest
from serving_tiny import save_tiny_model_dir
from test_server_cli import KEY, in_engine, launch, stop

pytestmark = pytest.mark.distributed


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_tensor_parallel_server_answers_openai_and_drains_on_sigterm(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    proc, base = launch(model, "--tensor-parallel-size", "2", "--max-num-seqs", "2", "--drain-timeout", "60")
    try:
        workers = [p for p in children(proc.pid) if "treespec.distributed.worker" in
                   Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 1
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content and chat.usage.completion_tokens == 8
        chunks = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == chat.choices[0].message.content  # greedy: the same text both ways

        results: list = [None] * 4
        def run(i: int) -> None:  # noqa: E306
            stream = client.completions.create(model="tiny", prompt=f"hello {i}", max_tokens=120, stream=True,
                                               extra_body={"ignore_eos": True})
            results[i] = [c.choices[0].finish_reason for c in stream if c.choices]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while in_engine(base) < len(threads):  # all four in the engine (two running, two waiting)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
        assert all(r is not None and r[-1] == "length" for r in results), results
        assert not any(alive(p) for p in workers), "a worker outlived the server"
    finally:
        stop(proc)
