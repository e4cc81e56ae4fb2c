"""Tensor parallelism on this CPU: TP=2 (two processes, 1 thread each) against one process (2 threads), plain and
speculative (auto: n-gram for greedy requests), on the default model, interleaved prompt by prompt in one run; then
pipeline parallelism (PP=2, 1 thread per rank) on a batch of requests with 1 and 2 micro-batches in flight, beside
one process on the same batch. Greedy; prints decode tokens/s, ratios and whether outputs equal one process's.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/tp.py [--limit 1] [--max-tokens 64]
        [--skip tp|pp] [--tp-weight-quantization auto|none]

Two shared cores can only show the overhead: two ranks of one thread do the work one process does with two threads,
plus two all-reduces per layer (TP) or a hand-off per micro-batch (PP).
"""
from __future__ import annotations

import argparse
import time

import torch

from treespec.api import LLM
from treespec.bench.dataset import load_prompts
from treespec.config import EngineConfig
from treespec.distributed.launch import start_parallel
from treespec.distributed.plan import ParallelPlan
from treespec.distributed.source import CheckpointSource
from treespec.engine.engine import LLMEngine
from treespec.models.registry import build_model
from treespec.sampling import SamplingParams
from treespec.weights.loader import load_checkpoint, resolve_model

MODEL = "gemma-3-270m"
AUTO = {"method": "auto"}


def decode_rate(llm: LLM, prompt: str, params: SamplingParams, speculate: bool,
                threads: int) -> tuple[list[int], float, float]:
    """(tokens, decode seconds, tokens/step) of one request alone."""
    torch.set_num_threads(threads)
    (out,) = llm.generate(prompt, params, speculate=speculate)
    return out.token_ids, out.metrics["decode_time_s"], out.metrics["mean_tokens_per_step"]


def batch_rate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float]:
    """(tokens of each request, wall seconds) of the whole batch run together (prefill included)."""
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params, speculate=False) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs], time.perf_counter() - t0


def tensor_parallel(prompts: list[str], params: SamplingParams, tp_weights: str) -> None:
    one = LLM(MODEL, speculative_config=AUTO, num_threads=2)
    tp = LLM(MODEL, speculative_config=AUTO, tensor_parallel_size=2, num_threads=1, weight_quantization=tp_weights)
    print(f"weights: one process {one.config.weight_quantization.value}, TP=2 {tp.config.weight_quantization.value} "
          f"({'; '.join(tp.target.rank_weights)})")
    print(f"{'prompt':>6} {'mode':>6} {'1 proc tok/s':>12} {'TP=2 tok/s':>10} {'ratio':>6} {'tok/step':>8} equal")
    totals = {m: [0, 0.0, 0.0] for m in ("plain", "auto")}
    for i, p in enumerate(prompts):
        for mode, speculate in (("plain", False), ("auto", True)):
            a, ta, _ = decode_rate(one, p, params, speculate, 2)
            b, tb, steps = decode_rate(tp, p, params, speculate, 1)
            totals[mode][0] += len(a)
            totals[mode][1] += ta
            totals[mode][2] += tb
            print(f"{i:>6} {mode:>6} {len(a) / ta:>12.1f} {len(b) / tb:>10.1f} {ta / tb:>6.2f} {steps:>8.2f} "
                  f"{'yes' if a == b else 'NO'}")
    for mode, (n, ta, tb) in totals.items():
        print(f"{'all':>6} {mode:>6} {n / ta:>12.1f} {n / tb:>10.1f} {ta / tb:>6.2f}")
    tp.close()


def pipeline(prompts: list[str], params: SamplingParams) -> None:
    one = LLM(MODEL, num_threads=2)
    ids = [one.encode_prompt(p) for p in prompts]
    torch.set_num_threads(2)
    ref, t_one = batch_rate(one.engine, ids, params)
    n = sum(len(r) for r in ref)
    print(f"batch of {len(ids)}: one process (2 threads) {n / t_one:.1f} tok/s")
    path = resolve_model(MODEL)
    config = EngineConfig(model=MODEL, pipeline_parallel_size=2)
    for micro in (1, 2):
        torch.set_num_threads(1)
        ckpt = load_checkpoint(str(path))
        model = build_model(ckpt.config, ckpt.tensors)
        target = start_parallel(CheckpointSource(path, hf_config=ckpt.config), config, model,
                                ParallelPlan(pipeline_parallel_size=2, micro_batches=micro))
        target.lm_head.prepare()
        out, t = batch_rate(LLMEngine(target, ckpt.tokenizer, config), ids, params)
        print(f"batch of {len(ids)}: PP=2 (1 thread per rank), {micro} micro-batch(es): {n / t:.1f} tok/s, "
              f"x{t_one / t:.2f} of one process; equal: {'yes' if out == ref else 'NO'}")
        target.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=1, help="Spec-Bench prompts per category")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip", choices=["tp", "pp"], default=None)
    ap.add_argument("--tp-weight-quantization", default="auto",
                    help="TP=2's weight mode (auto: the GGUF's blocks, as one process; 'none' for fp32 shards)")
    args = ap.parse_args()
    prompts = [p.text for p in load_prompts(None, args.limit)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    if args.skip != "tp":
        tensor_parallel(prompts, params, args.tp_weight_quantization)
    if args.skip != "pp":
        pipeline(prompts, params)


if __name__ == "__main__":
    main()
