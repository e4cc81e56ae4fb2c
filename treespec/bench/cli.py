"""`treespec bench --mode spec|ar|serve`: Spec-Bench methods, plain decoding vs HF, or the live server."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHOD_SHORTHANDS = {
    "ngram": {"method": "ngram"},
    "auto": {"method": "auto"},
    "layer_skip": {"method": "layer_skip", "draft_vocab_size": 32768},
}


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: Spec-Bench (spec), plain decoding vs HF (ar), server load (serve)")
    b.add_argument("--mode", choices=["spec", "ar", "serve"], default="spec")
    b.add_argument("--model", default="gemma-3-270m")
    b.add_argument("--method", action="append", default=None,
                   help="name=JSON speculative config or a shorthand (ngram); repeatable")
    b.add_argument("--dataset", default=None, help="JSONL with 'turns' or 'prompt' (default: shipped Spec-Bench)")
    b.add_argument("--limit", type=int, default=10, help="prompts per category")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0, help="spec mode: 0 = greedy (default), else sampled")
    b.add_argument("--seed", type=int, default=0, help="spec mode: sampling seed of every request")
    b.add_argument("--no-chat", action="store_true", help="feed prompts raw instead of through the chat template")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--weight-quantization", choices=["none", "fp16", "int8"], default="none")
    b.add_argument("--out", default="bench_out", help="folder for results.json, results.md, speedup.png")
    b.add_argument("--concurrency", default="1,4,16", help="serve mode: comma-separated client counts")
    b.set_defaults(handler=cmd_bench)


def parse_methods(items: list[str] | None) -> dict[str, dict | None]:
    from treespec.errors import ConfigError
    methods: dict[str, dict | None] = {"plain": None}
    for item in items or ["ngram"]:
        name, _, raw = item.partition("=")
        if raw:
            try:
                methods[name] = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"--method {name}: not valid JSON") from None
        elif item in METHOD_SHORTHANDS:
            methods[item] = METHOD_SHORTHANDS[item]
        else:
            raise ConfigError(f"--method {item!r}: use a shorthand ({', '.join(METHOD_SHORTHANDS)}) or name=JSON")
    return methods


def cmd_bench(args: argparse.Namespace) -> int:
    from treespec.errors import ConfigError
    if args.limit <= 0 or args.max_tokens <= 0:
        raise ConfigError("--limit and --max-tokens must be positive")
    if not 0.0 <= args.temperature <= 10.0:
        raise ConfigError("--temperature: must be in [0, 10]")
    if args.mode == "serve":
        from treespec.bench.serve import cmd_bench_serve
        return cmd_bench_serve(args)
    from treespec.api import LLM
    from treespec.bench.dataset import load_prompts
    prompts = load_prompts(args.dataset, args.limit)
    methods = parse_methods(args.method) if args.mode == "spec" else {"plain": None}
    t0 = time.perf_counter()
    llm = LLM(args.model, num_threads=args.threads, weight_quantization=args.weight_quantization, progress=True)
    load_s = time.perf_counter() - t0
    print(f"model loaded in {load_s:.1f} s")
    if args.mode == "ar":
        return _bench_ar(llm, prompts, args)
    from treespec.bench.report import markdown_table, write_outputs
    from treespec.bench.spec_bench import run_methods, summarize
    from treespec.sampling import SamplingParams
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed if args.temperature > 0 else None)
    records = run_methods(llm, methods, prompts, params, chat=not args.no_chat)
    summary = summarize(records)
    raw = {"methods": methods, "model": args.model, "max_tokens": args.max_tokens, "limit": args.limit,
           "temperature": args.temperature, "seed": params.seed, "load_s": load_s,
           "records": [r.as_dict() for r in records]}
    mode = "greedy" if args.temperature == 0 else f"T={args.temperature:g}"
    paths = write_outputs(Path(args.out), raw, summary, f"Spec-Bench, {args.model}, {mode}, {args.max_tokens} tokens")
    print(markdown_table(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _bench_ar(llm, prompts, args) -> int:
    from treespec.bench.ar import build_hf_model, bytes_per_step, measure_bandwidth, run_hf, run_treespec
    ids = [llm.encode_prompt(p.text, chat=not args.no_chat) for p in prompts[: max(1, min(len(prompts), 3))]]
    ours = run_treespec(llm, ids, args.max_tokens)
    hf = run_hf(build_hf_model(llm), ids, args.max_tokens)
    bw = measure_bandwidth()
    nbytes = bytes_per_step(llm.target)
    ms_step = 1000 / ours.tokens_per_s if ours.tokens_per_s else float("nan")
    print("| engine | tokens | decode tok/s | ms/token |")
    print("|---|---|---|---|")
    for r in (ours, hf):
        print(f"| {r.name} | {r.tokens} | {r.tokens_per_s:.2f} | {1000 / max(r.tokens_per_s, 1e-9):.1f} |")
    print(f"\ntreespec / HF = x{ours.tokens_per_s / max(hf.tokens_per_s, 1e-9):.2f}")
    print(f"roofline: {nbytes / 1e6:.0f} MB of weights per step at {bw / 1e9:.1f} GB/s measured read bandwidth "
          f"= {1000 * nbytes / bw:.1f} ms/step; treespec runs {ms_step:.1f} ms/step "
          f"({100 * (nbytes / bw) / (ms_step / 1000):.0f}% of roofline)")
    return 0
