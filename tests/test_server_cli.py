"""`treespec serve` as a real process: loopback default, API key from the environment, SIGTERM/SIGINT drain,
the drain deadline, the waiting bound and token-id checks."""
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
from serving_tiny import save_tiny_model_dir, tiny_backend

from treespec.cli_args import build_parser

KEY = "env-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_defaults_to_loopback():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1" and args.command == "serve"


def launch(model, *flags: str) -> tuple[subprocess.Popen, str]:
    """Start `treespec serve` on the tiny model with the API key in the environment; wait until /health is 200."""
    port = free_port()
    env = {**os.environ, "TREESPEC_API_KEY": KEY}
    cmd = [sys.executable, "-m", "treespec.cli", "serve", "--model", str(model), "--port", str(port),
           "--threads", "1", "--served-model-name", "tiny", *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture
def serve_process(tiny_model):
    proc, base = launch(tiny_model, "--max-num-seqs", "1", "--drain-timeout", "60")
    yield proc, base
    stop(proc)


def in_engine(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("treespec:num_requests_running{", "treespec:num_requests_waiting{")))


def stream_all(base: str, results: list, i: int, max_tokens: int = 200) -> None:
    body = {"prompt": f"hello {i}", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        events = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    results[i] = events


def start_streams(base: str, n: int, max_tokens: int) -> tuple[list[threading.Thread], list]:
    """n streaming requests in threads; returns once the engine holds all n (running or waiting) but those that
    already finished (on a loaded machine the first may end before the last is sent)."""
    results: list = [None] * n
    threads = [threading.Thread(target=stream_all, args=(base, results, i, max_tokens)) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while in_engine(base) + sum(r is not None for r in results) < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return threads, results


def test_api_key_from_env_and_sigterm_drains(serve_process):
    proc, base = serve_process
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

    n = 6  # one runs (--max-num-seqs 1), five wait in the queue when SIGTERM arrives
    threads, results = start_streams(base, n, 200)
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_drain_timeout_ends_unfinished_streams_with_abort_and_done(tiny_model, sig):
    """Streams still running when --drain-timeout expires get a finish_reason "abort" chunk and [DONE]; Ctrl+C
    (SIGINT) drains like SIGTERM and exits 0."""
    drain = 1.5
    proc, base = launch(tiny_model, "--max-num-seqs", "1", "--drain-timeout", str(drain))
    try:
        n = 16  # one at a time, ~0.4 s each here: some finish during the drain, the rest cannot
        threads, results = start_streams(base, n, 200)
        proc.send_signal(sig)
        t0 = time.monotonic()
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 < drain + 4  # ended by the drain, not by uvicorn's later deadline
        log = proc.stdout.read()
        assert "Traceback" not in log and "CancelledError" not in log, log
        assert "treespec: ready after" in log  # the load said what it was doing, and when it was done
    finally:
        stop(proc)
    reasons = []
    for events in results:
        assert events[-1] == "[DONE]", events[-3:]
        usage = json.loads(events[-2])["usage"]
        reason = json.loads(events[-3])["choices"][0]["finish_reason"]
        assert (reason, usage["completion_tokens"] == 200) in (("length", True), ("abort", False))
        reasons.append(reason)
    assert "abort" in reasons


def test_negative_max_waiting_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--max-waiting", "-1"])
    assert e.value.code == 2 and "--max-waiting" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--max-waiting", "0"]).max_waiting == 0


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bad_drain_timeout_is_a_usage_error(capsys, value):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--drain-timeout", value])
    assert e.value.code == 2 and "--drain-timeout" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--drain-timeout", "0"]).drain_timeout == 0.0


@pytest.fixture(scope="module")
def no_waiting(tiny_model):
    """`--max-waiting 0 --max-num-seqs 2`: two requests run at once and none may wait."""
    proc, base = launch(tiny_model, "--max-num-seqs", "2", "--max-waiting", "0")
    with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        yield http
    stop(proc)


def assert_error(resp: httpx.Response, status: int, param: str | None) -> None:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param, resp.text


def test_max_waiting_zero_admits_into_free_running_slots(no_waiting):
    body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True}
    assert no_waiting.post("/v1/completions", json={**body, "max_tokens": 4}).status_code == 200
    with no_waiting.stream("POST", "/v1/completions", json={**body, "n": 2, "stream": True}) as running:
        lines = running.iter_lines()  # (keep the iterator: dropping it closes the connection)
        assert running.status_code == 200 and next(lines).startswith("data: ")  # both slots busy now
        resp = no_waiting.post("/v1/completions", json=body)  # would have to wait: the bound (0) applies
        assert_error(resp, 429, None)
        assert resp.json()["error"]["code"] == "queue_full"
    deadline = time.monotonic() + 10
    while in_engine(str(no_waiting.base_url).rstrip("/")) > 0:  # the closed stream's two slots are free again
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_n_beyond_what_the_server_can_hold_is_400(no_waiting):
    body = {"prompt": "hello", "max_tokens": 4}
    assert len(no_waiting.post("/v1/completions", json={**body, "n": 2}).json()["choices"]) == 2
    assert_error(no_waiting.post("/v1/completions", json={**body, "n": 3}), 400, "n")  # 2 running + 0 waiting


def test_out_of_range_token_ids_are_400_in_prompt_and_stop_token_ids(no_waiting):
    vocab = tiny_backend().get_vocab_size(with_added_tokens=True)  # the tiny model's vocabulary too
    for big in (10**9, vocab):
        assert_error(no_waiting.post("/v1/completions", json={"prompt": [1, big], "max_tokens": 4}), 400, "prompt")
        assert_error(no_waiting.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4,
                                                              "stop_token_ids": [5, big]}), 400, "stop_token_ids")
    last = no_waiting.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stop_token_ids": [vocab - 1]})
    assert last.status_code == 200
