"""`treespec bench --mode spec|ar|serve`: Spec-Bench methods, plain decoding vs HF, or the live server."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from treespec.cli_args import load_kwargs, parse_methods


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
    llm = LLM(args.model, num_threads=args.threads, weight_quantization=args.weight_quantization, progress=True,
              **load_kwargs(args))
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
