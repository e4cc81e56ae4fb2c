"""`treespec serve` as a real process: loopback default, API key from the environment, SIGTERM drain."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving_tiny import save_tiny_model_dir

from treespec.cli_args import build_parser

KEY = "env-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_defaults_to_loopback():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1" and args.command == "serve"


@pytest.fixture
def serve_process(tmp_path):
    model = save_tiny_model_dir(tmp_path / "tiny")
    port = free_port()
    env = {**os.environ, "TREESPEC_API_KEY": KEY}
    cmd = [sys.executable, "-m", "treespec.cli", "serve", "--model", str(model), "--port", str(port),
           "--threads", "1", "--max-num-seqs", "1", "--drain-timeout", "60", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.2)
    yield proc, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def in_engine(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("treespec:num_requests_running{", "treespec:num_requests_waiting{")))


def stream_all(base: str, results: list, i: int) -> None:
    body = {"prompt": f"hello {i}", "max_tokens": 200, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        events = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    results[i] = events


def test_api_key_from_env_and_sigterm_drains(serve_process):
    proc, base = serve_process
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

    n = 6  # one runs (--max-num-seqs 1), five wait in the queue when SIGTERM arrives
    results: list = [None] * n
    threads = [threading.Thread(target=stream_all, args=(base, results, i)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while in_engine(base) < n:  # all six admitted before the signal
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no longer accepting connections
        httpx.get(f"{base}/health", timeout=2)
    for t in threads:
        t.join(120)
    assert proc.wait(60) == 0
    for events in results:  # every in-flight request finished in full
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 200
