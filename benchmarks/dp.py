"""Serving throughput of `treespec serve --data-parallel-size 2` (two engine replicas on a local Ray cluster, one
thread each) against one engine (`treespec serve`, two threads), side by side in one run: the same load generator
as `treespec bench --mode serve` (closed-loop streaming chat clients over Spec-Bench prompts, greedy), each server
a fresh process started here and stopped with SIGTERM. --rounds 2 runs A B A B to show the run-to-run noise.
Beside tokens per wall second it reports tokens per CPU second of the server's whole session (HTTP process,
replicas, Ray's daemons): on a shared, oversubscribed machine the scheduler gives more CPU to a setup with more
processes, and only the CPU-time ratio says what the replicas cost.
Ray's memory monitor is off for these servers (RAY_memory_monitor_refresh_ms=0): on a shared machine it counts
every process's memory toward its 95% threshold and kills replicas (and Serve's controller) for others' use.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/dp.py \\
        [--model gemma-3-270m] [--concurrency 16] [--max-tokens 64] [--rounds 1] [--ngram]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from treespec.bench.dataset import load_prompts
from treespec.bench.serve import LevelResult, interleave, run_level

SETUPS: dict[str, list[str]] = {  # name -> serve flags; both use the machine's two cores
    "one engine, 2 threads": ["--threads", "2"],
    "DP=2, 1 thread each": ["--data-parallel-size", "2", "--threads", "1"],
}
START_TIMEOUT_S = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, flags: list[str]) -> tuple[subprocess.Popen, str, float]:
    """`treespec serve` in its own session; returns once /health is 200 (with the seconds that took)."""
    port = free_port()
    cmd = [sys.executable, "-m", "treespec.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-num-seqs", str(args.concurrency), *flags, *(["--ngram"] if args.ngram else [])]
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"`{' '.join(cmd)}` exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base, time.monotonic() - t0
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > START_TIMEOUT_S:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(f"`{' '.join(cmd)}` was not ready after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def session_cpu_s(sid: int) -> float:
    """User + system CPU seconds of the live processes of session sid (from /proc: Linux only)."""
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Run:
    load: LevelResult
    cpu_s: float  # CPU seconds the server's session used while measured

    @property
    def per_cpu_s(self) -> float:
        return self.load.num_tokens / self.cpu_s


def measure(args: argparse.Namespace, name: str, flags: list[str], prompts: list[str]) -> Run:
    proc, base, ready_s = start_server(args, flags)
    try:
        asyncio.run(run_level(base, args.model, prompts[:2], 2, 8, chat=True))  # warm-up, not counted
        cpu0 = session_cpu_s(proc.pid)
        traces, errors, wall = asyncio.run(run_level(base, args.model, prompts, args.concurrency, args.max_tokens,
                                                     chat=True))
        cpu = session_cpu_s(proc.pid) - cpu0
    finally:
        stop_server(proc)
    result = LevelResult(name, args.concurrency, len(traces), sum(t.num_tokens for t in traces), wall, traces,
                         errors)
    print(f"{name}: ready after {ready_s:.0f} s; {result.num_tokens} tokens in {wall:.1f} s = "
          f"{result.throughput:.1f} tokens/s, {cpu:.0f} CPU s = {result.num_tokens / cpu:.1f} tokens per CPU s, "
          f"{len(errors)} errors", flush=True)
    return Run(result, cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--concurrency", type=int, default=16, help="streaming clients")
    ap.add_argument("--requests", type=int, default=None, help="requests in all (default 2 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="A B pairs, run in turn")
    ap.add_argument("--ngram", action="store_true", help="serve with n-gram speculation (both setups)")
    args = ap.parse_args()
    count = args.requests or 2 * args.concurrency
    prompts = [p.text for p in interleave(load_prompts(None, -(-count // 6)))][:count]
    results: dict[str, list[Run]] = {name: [] for name in SETUPS}
    for _ in range(args.rounds):
        for name, flags in SETUPS.items():
            results[name].append(measure(args, name, flags, prompts))
    first = results[next(iter(SETUPS))]
    print(f"\n{args.model}, {args.concurrency} streams, {count} greedy chat requests of {args.max_tokens} tokens"
          f"{', n-gram speculation' if args.ngram else ''}; {os.cpu_count()} CPUs")
    print("| setup | round | tokens/s | vs one engine | tokens per CPU s | vs one engine | TTFT p50 ms | ITL p50 ms "
          "| errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        for i, (run, one) in enumerate(zip(runs, first)):
            r = run.load
            print(f"| {name} | {i + 1} | {r.throughput:.1f} | x{r.throughput / one.load.throughput:.2f} "
                  f"| {run.per_cpu_s:.1f} | x{run.per_cpu_s / one.per_cpu_s:.2f} | {1000 * r.ttft(50):.0f} "
                  f"| {1000 * r.itl(50):.1f} | {len(r.errors)} |")
    for name, runs in results.items():
        for e in sorted({e for run in runs for e in run.load.errors}):
            print(f"{name} error: {e}")


if __name__ == "__main__":
    main()
