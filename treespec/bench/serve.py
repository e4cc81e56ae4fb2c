"""`treespec bench --mode serve`: a load generator against the live OpenAI server, plain vs speculative. The model
loads once; each method gets its own engine and an in-process server on a loopback port. For each concurrency c, c
closed-loop streaming clients send greedy requests, chat or completion as `--prompt-form` says (max(4, 2c) in all,
from the Spec-Bench prompts, categories interleaved). Reported per (method, c): throughput (completion tokens /
wall time), time to first token and inter-token latency p50/p99. A chunk that carries k tokens (speculation emits
several per step) counts as k inter-token gaps of (gap / k); token counts come from vLLM-style
`continuous_usage_stats`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

from treespec.bench.dataset import BenchPrompt, load_prompts
from treespec.bench.prompt_form import PromptForm, form_for, prompt_text
from treespec.cli_args import load_kwargs, parse_methods

REQUEST_TIMEOUT_S = 600.0


@dataclass
class RequestTrace:
    ttft_s: float
    itl_s: list[float]
    num_tokens: int


@dataclass
class LevelResult:
    method: str
    concurrency: int
    num_requests: int
    num_tokens: int
    wall_s: float
    traces: list[RequestTrace] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.num_tokens / self.wall_s if self.wall_s else 0.0

    def ttft(self, q: float) -> float:
        return percentile([t.ttft_s for t in self.traces], q)

    def itl(self, q: float) -> float:
        return percentile([x for t in self.traces for x in t.itl_s], q)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def interleave(prompts: list[BenchPrompt]) -> list[BenchPrompt]:
    """Round-robin over categories so any prefix of the list mixes them."""
    by_cat: dict[str, list[BenchPrompt]] = {}
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    rows = [rows for rows in by_cat.values()]
    return [r[i] for i in range(max(map(len, rows))) for r in rows if i < len(r)]


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, chat: bool) -> RequestTrace:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    ttft, last, tokens, itl = None, t0, 0, []
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"server answered {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']['message']}")
            new = (chunk.get("usage") or {}).get("completion_tokens", tokens) - tokens
            if new <= 0:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            else:
                itl.extend([(now - last) / new] * new)
            last, tokens = now, tokens + new
    return RequestTrace(ttft if ttft is not None else time.perf_counter() - t0, itl, tokens)


async def run_level(base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                    chat: bool) -> tuple[list[RequestTrace], list[str], float]:
    """Closed loop: `concurrency` clients each send the next prompt as soon as their last one finished."""
    todo: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        todo.put_nowait(p)
    traces: list[RequestTrace] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while not todo.empty():
            try:
                traces.append(await stream_one(client, model, todo.get_nowait(), max_tokens, chat))
            except (RuntimeError, httpx.HTTPError) as e:  # counted and shown, the run goes on
                errors.append(str(e))

    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return traces, errors, time.perf_counter() - t0


def markdown_table(results: list[LevelResult]) -> str:
    plain = {r.concurrency: r.throughput for r in results if r.method == "plain"}
    lines = ["| method | concurrency | requests | errors | tokens | tokens/s | vs plain | TTFT p50 ms | TTFT p99 ms "
             "| ITL p50 ms | ITL p99 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r.throughput / plain[r.concurrency] if plain.get(r.concurrency) else float("nan")
        lines.append(f"| {r.method} | {r.concurrency} | {r.num_requests} | {len(r.errors)} | {r.num_tokens} "
                     f"| {r.throughput:.2f} "
                     f"| x{ratio:.2f} | {1000 * r.ttft(50):.0f} | {1000 * r.ttft(99):.0f} "
                     f"| {1000 * r.itl(50):.1f} | {1000 * r.itl(99):.1f} |")
    return "\n".join(lines)


def cmd_bench_serve(args: argparse.Namespace, asked: PromptForm) -> int:
    from treespec.api import LLM
    from treespec.engine.async_engine import AsyncEngine
    from treespec.errors import ConfigError
    from treespec.server.app import create_app
    from treespec.server.background import BackgroundServer
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise ConfigError(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise ConfigError("--concurrency: every level must be >= 1")
    llm = LLM(args.model, num_threads=args.threads, weight_quantization=args.weight_quantization,
              max_num_seqs=max(levels), max_waiting=max(256, 2 * max(levels)), progress=True,
              **load_kwargs(args))
    form = form_for(llm, asked)
    prompts = [prompt_text(p, form) for p in interleave(load_prompts(args.dataset, args.limit))]
    results: list[LevelResult] = []
    for method, spec in parse_methods(args.method).items():
        app = create_app(AsyncEngine(llm.make_engine(spec)), llm.tokenizer, model_name=args.model)
        with BackgroundServer(app) as server:
            for c in levels:
                batch = prompts[: min(len(prompts), max(4, 2 * c))]
                traces, errors, wall = asyncio.run(run_level(server.base_url, args.model, batch, c,
                                                             args.max_tokens, chat=form is PromptForm.CHAT))
                results.append(LevelResult(method, c, len(traces), sum(t.num_tokens for t in traces), wall,
                                           traces, errors))
                print(f"{method} c={c}: {results[-1].throughput:.2f} tokens/s, {len(errors)} errors", flush=True)
    print(markdown_table(results))
    for r in results:
        for e in sorted(set(r.errors)):
            print(f"{r.method} c={r.concurrency} error: {e}")
    return 0
