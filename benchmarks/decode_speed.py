"""Plain decoding speed side by side in one process, interleaved prompt by prompt: treespec's weight modes
(and `--speculative auto`) against llama.cpp (llama-cpp-python, when installed) on the same GGUF; and the
cost of verifying a k-node tree against a one-token step, c(k) / c(1) (one target forward + the greedy head).

Reports wall-clock tok/s and process CPU time per token (both threads summed): on a shared machine the CPU
time moves less with other processes' load. Completion-form Spec-Bench prompts (the default model is a base
model), greedy.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/decode_speed.py \\
        [--limit 1] [--max-tokens 96] [--threads 2] [--modes blocks,none] [--auto] [--tree 1,4,16] [--no-llama]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from treespec.api import LLM
from treespec.attention.metadata import SeqAttention
from treespec.bench.dataset import load_prompts
from treespec.sampling import SamplingParams


def timed(fn) -> tuple[float, float, object]:  # -> (wall s, CPU s, result)
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def llama_runner(model_path: str, threads: int, max_tokens: int):
    """A greedy completion with llama.cpp over the same GGUF -> (prompt -> generated token count); None when
    llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, verbose=False)

    def run(prompt: str) -> int:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["usage"]["completion_tokens"]
    return run


@torch.inference_mode()
def tree_cost(llm: LLM, prompt_ids: list[int], sizes: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    """Median (wall ms, CPU ms) of one forward of k chain-shaped draft rows after the prompt + the greedy head."""
    model = llm.target
    cache = model.new_cache(len(prompt_ids) + max(sizes) + 1)
    cache.reserve(len(prompt_ids))
    model(torch.tensor(prompt_ids), torch.arange(len(prompt_ids)), [SeqAttention(cache, 0, len(prompt_ids))])
    cache.commit()
    samples: dict[int, list[tuple[float, float]]] = {k: [] for k in sizes}
    for _ in range(rounds):
        for k in sizes:  # interleaved
            pos = torch.arange(cache.length, cache.length + k)
            tokens = torch.tensor(prompt_ids[-k:] if k <= len(prompt_ids) else prompt_ids * k)[:k]
            mask = torch.ones(k, k, dtype=torch.bool).tril() if k > 1 else None

            def step() -> torch.Tensor:
                cache.reserve(k, pos)
                h = model(tokens, pos, [SeqAttention(cache, 0, k, tree_mask=mask)])
                return model.lm_head.argmax(h)
            wall, cpu, _ = timed(step)
            cache.commit([])  # drop the pending rows
            samples[k].append((wall * 1e3, cpu * 1e3))
    return {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--limit", type=int, default=1, help="prompts per Spec-Bench category")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="blocks,none", help="treespec weight modes, comma-separated")
    ap.add_argument("--auto", action="store_true", help="also `--speculative auto` over the first mode")
    ap.add_argument("--tree", default="1,4,16", help="tree sizes k for c(k) / c(1); empty: skip")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds of the tree timing")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: seeded sampling (seed = prompt number)")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    llms = {m: LLM(args.model, weight_quantization=m, num_threads=args.threads) for m in modes}
    first = llms[modes[0]]
    engines = {f"treespec {m}": (llms[m], llms[m].engine) for m in modes}
    if args.auto:
        engines[f"treespec {modes[0]} + auto"] = (first, first.make_engine({"method": "auto"}))
    llama = None if args.no_llama else llama_runner(str(first.checkpoint_source), args.threads, args.max_tokens)
    prompts = load_prompts(None, args.limit)
    totals: dict[str, list[float]] = {}  # name -> [tokens, wall s, CPU s]
    outputs: dict[str, list[list[int]]] = {}
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                seed=i if args.temperature > 0 else None)
        for name, (llm, engine) in engines.items():
            llm.engine = engine
            wall, cpu, out = timed(lambda: llm.generate(p.text, params)[0].token_ids)  # noqa: B023 (called at once)
            outputs.setdefault(name, []).append(out)
            t = totals.setdefault(name, [0, 0.0, 0.0])
            t[0], t[1], t[2] = t[0] + len(out), t[1] + wall, t[2] + cpu
        if llama is not None and args.temperature == 0:
            wall, cpu, n = timed(lambda: llama(p.text))
            t = totals.setdefault("llama.cpp", [0, 0.0, 0.0])
            t[0], t[1], t[2] = t[0] + n, t[1] + wall, t[2] + cpu
    ref = "llama.cpp" if "llama.cpp" in totals else f"treespec {modes[0]}"
    how = f"T = {args.temperature}, seeded" if args.temperature > 0 else "greedy"
    print(f"\n{args.model}, {len(prompts)} completion-form prompts, {args.max_tokens} tokens, {how}, "
          f"{args.threads} threads, interleaved in one process")
    print(f"| engine | tok/s | vs {ref} | CPU ms/token | vs {ref} (CPU) |\n|---|---|---|---|---|")
    for name, (n, wall, cpu) in totals.items():
        rn, rw, rc = totals[ref]
        print(f"| {name} | {n / wall:.1f} | x{(n / wall) / (rn / rw):.2f} | {1e3 * cpu / n:.1f} | "
              f"x{(rc / rn) / (cpu / n):.2f} |")
    plain = outputs[f"treespec {modes[0]}"]
    for name, outs in outputs.items():
        print(f"{name}: output == treespec {modes[0]} plain on {sum(a == b for a, b in zip(outs, plain))}/{len(plain)}")
    if args.tree:
        sizes = [int(k) for k in args.tree.split(",")]
        ids = first.encode_prompt(prompts[0].text)
        for m in modes:
            cost = tree_cost(llms[m], ids, sizes, args.rounds)
            base = cost[sizes[0]]
            print(f"tree cost, {m}: " + ", ".join(f"c({k}) {w:.1f} ms (CPU {c:.1f}) = x{w / base[0]:.2f} "
                                                  f"(CPU x{c / base[1]:.2f})" for k, (w, c) in cost.items()))


if __name__ == "__main__":
    main()
