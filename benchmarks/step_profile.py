"""Where a plain decode step's time goes, by part, with kernels/decode_ops on and off in one process.

Wraps the parts (block products, attention, MLP, RMSNorm, the attention kernel, RoPE, KV writes, masks, the
greedy head, the engine step) with process-CPU-time counters (both threads summed: steadier than wall time on a
shared machine; a 2-thread product counts twice its wall time) and decodes a completion-form prompt greedily,
alternating torch's ops ("before") and decode_ops ("after"); per setting the best of `--runs` generations.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/step_profile.py [--weights auto] [--tokens 64]
"""
from __future__ import annotations

import argparse
import collections
import time
from typing import Callable

import torch

from treespec.api import LLM
from treespec.engine import engine
from treespec.kernels import decode_ops
from treespec.kv import cache
from treespec.models import base, layers, lm_head, quant_blocks
from treespec.sampling import SamplingParams

PROMPT = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?\nAnswer:")
spent: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter[str] = collections.Counter()


def counted(key: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        t = time.process_time()
        out = fn(*args, **kwargs)
        spent[key] += time.process_time() - t
        calls[key] += 1
        return out
    return wrapper


def instrument(llm: LLM) -> None:
    quant_blocks.BlockQuantLinear.forward = counted("block products", quant_blocks.BlockQuantLinear.forward)
    layers.Linear.forward = counted("fp32 products", layers.Linear.forward)
    layers.Attention.forward = counted("attention (incl. q/k/v, o)", layers.Attention.forward)
    layers.MLP.forward = counted("MLP (incl. its products)", layers.MLP.forward)
    layers.rms_norm = counted("RMSNorm", layers.rms_norm)
    layers.apply_rope = counted("RoPE", layers.apply_rope)
    layers.ForwardBatch.mask = counted("masks", layers.ForwardBatch.mask)
    cache.KVCache.write = counted("KV write", cache.KVCache.write)
    base.CausalLM.forward = counted("model forward", base.CausalLM.forward)
    lm_head.LMHead.argmax = counted("greedy head", lm_head.LMHead.argmax)
    engine.LLMEngine.step = counted("engine step", engine.LLMEngine.step)
    for layer in llm.target.layers:
        layer.self_attn.attend = counted("attention kernel", layer.self_attn.attend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="auto", help="weight_quantization")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(weight_quantization=args.weights, num_threads=args.threads)
    instrument(llm)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    llm.generate(PROMPT, params)
    kernels = decode_ops.compiled
    for label, choice in [("before (torch ops)", lambda: None), ("after (decode_ops)", kernels)] * 2:
        decode_ops.compiled = choice
        best = None
        for _ in range(args.runs):
            spent.clear()
            calls.clear()
            t = time.process_time()
            n = len(llm.generate(PROMPT, params)[0].token_ids)
            run = (time.process_time() - t) / n, dict(spent), dict(calls)
            best = run if best is None or run[0] < best[0] else best
        per_token, parts, counts = best
        steps = counts["engine step"]
        print(f"{label}: {1e3 * per_token:.2f} CPU ms per token, {steps} steps")
        for key in sorted(parts, key=lambda k: -parts[k]):
            print(f"  {key:28s} {1e3 * parts[key] / steps:7.2f} CPU ms/step  {counts[key] / steps:5.1f} calls/step  "
                  f"{1e6 * parts[key] / counts[key]:8.1f} us/call")


if __name__ == "__main__":
    main()
