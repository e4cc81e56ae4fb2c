"""`treespec bench --mode spec|ar|serve`: Spec-Bench methods, plain decoding vs llama.cpp and HF, or the live server.

Prompts go in the form `--prompt-form` names (bench/prompt_form.py: completion form for base models by default)."""
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
    from treespec.bench.prompt_form import asked_form, form_for
    asked = asked_form(args.prompt_form, args.no_chat)
    if args.mode == "serve":
        from treespec.bench.serve import cmd_bench_serve
        return cmd_bench_serve(args, asked)
    from treespec.api import LLM
    from treespec.bench.dataset import load_prompts
    prompts = load_prompts(args.dataset, args.limit)
    t0 = time.perf_counter()
    llm = LLM(args.model, num_threads=args.threads, weight_quantization=args.weight_quantization, progress=True,
              **load_kwargs(args))
    load_s = time.perf_counter() - t0
    print(f"model loaded in {load_s:.1f} s")
    form = form_for(llm, asked)
    if args.mode == "ar":
        return _bench_ar(llm, prompts, form, args)
    from treespec.bench.report import markdown_table, write_outputs
    from treespec.bench.spec_bench import run_methods, summarize
    from treespec.sampling import SamplingParams
    methods = parse_methods(args.method)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed if args.temperature > 0 else None)
    records = run_methods(llm, methods, prompts, params, form)
    summary = summarize(records)
    raw = {"methods": methods, "model": args.model, "max_tokens": args.max_tokens, "limit": args.limit,
           "temperature": args.temperature, "seed": params.seed, "prompt_form": form.value, "load_s": load_s,
           "records": [r.as_dict() for r in records]}
    mode = "greedy" if args.temperature == 0 else f"T={args.temperature:g}"
    title = f"Spec-Bench, {args.model}, {form.value} form, {mode}, {args.max_tokens} tokens"
    paths = write_outputs(Path(args.out), raw, summary, title)
    print(markdown_table(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _bench_ar(llm, prompts, form, args) -> int:
    from treespec.bench.ar import bytes_per_step, measure_bandwidth
    from treespec.bench.ar_compare import compare_ar
    from treespec.bench.prompt_form import encode
    ids = [encode(llm, p, form) for p in prompts[: max(1, min(len(prompts), 3))]]
    methods = parse_methods(args.method) if args.method else {"plain": None}
    result = compare_ar(llm, ids, args.max_tokens, methods)
    print(result.markdown())
    plain = result.treespec[0]
    bw, nbytes = measure_bandwidth(), bytes_per_step(llm.target)
    ms_step = 1000 / plain.tokens_per_s if plain.tokens_per_s else float("nan")
    print(f"roofline: {nbytes / 1e6:.0f} MB of weights per step at {bw / 1e9:.1f} GB/s measured read bandwidth "
          f"= {1000 * nbytes / bw:.1f} ms/step; treespec runs {ms_step:.1f} ms/step "
          f"({100 * (nbytes / bw) / (ms_step / 1000):.0f}% of roofline)")
    return 0
