"""Where a plain decode step's time goes, by part: torch's ops, kernels/decode_ops called from the modules, and
kernels/decode_stack (the decoder layers in one C++ call), in one process.

Wraps the parts (block products, attention, MLP, RMSNorm, the attention kernel, RoPE, KV writes, masks, the
decoder-layer glue, the decoder stack, the greedy head, the engine step) with process-CPU-time counters (both
threads summed: steadier than wall time on a shared machine; a 2-thread product counts twice its wall time;
`--clock wall` on a quiet one) and decodes a completion-form prompt greedily, alternating the three settings; per
setting the best of `--runs` generations. Inside the stack the parts are C++ calls the counters do not see.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/step_profile.py [--weights auto] [--tokens 64]
        [--clock wall]
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
from treespec.models import base, decode_stack, layers, lm_head, quant_blocks
from treespec.sampling import SamplingParams

PROMPT = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?\nAnswer:")
clock = time.process_time
spent: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter[str] = collections.Counter()


def counted(key: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        t = clock()
        out = fn(*args, **kwargs)
        spent[key] += clock() - t
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
    decode_ops.attention = counted("attention kernel", decode_ops.attention)
    decode_ops.cached_attention = counted("KV write + attention kernel", decode_ops.cached_attention)
    decode_ops.qk_norm_rope = counted("q/k norm + RoPE", decode_ops.qk_norm_rope)
    decode_ops.residual_norm = counted("residual + norms", decode_ops.residual_norm)
    decode_ops.act_mul = counted("activation * up", decode_ops.act_mul)
    decode_stack.DecodeStack.run = counted("decoder layers in one call", decode_stack.DecodeStack.run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="auto", help="weight_quantization")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="wall: elapsed time (on a quiet machine: what a step costs; cpu counts both threads)")
    args = ap.parse_args()
    global clock
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    llm = LLM(weight_quantization=args.weights, num_threads=args.threads)
    instrument(llm)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    llm.generate(PROMPT, params)
    kernels = decode_ops.compiled
    settings = [("torch ops", lambda: None, False), ("decode_ops from the modules", kernels, False),
                ("decode_stack (the layers in one call)", kernels, True)]
    for label, choice, stack in settings * 2:
        decode_ops.compiled = choice
        llm.target.use_decode_stack = stack
        best = None
        for _ in range(args.runs):
            spent.clear()
            calls.clear()
            t = clock()
            n = len(llm.generate(PROMPT, params)[0].token_ids)
            run = (clock() - t) / n, dict(spent), dict(calls)
            best = run if best is None or run[0] < best[0] else best
        per_token, parts, counts = best
        steps = counts["engine step"]
        unit = "CPU ms" if args.clock == "cpu" else "ms"
        print(f"{label}: {1e3 * per_token:.2f} {unit} per token, {steps} steps")
        for key in sorted(parts, key=lambda k: -parts[k]):
            print(f"  {key:28s} {1e3 * parts[key] / steps:7.2f} {unit}/step  {counts[key] / steps:5.1f} calls/step  "
                  f"{1e6 * parts[key] / counts[key]:8.1f} us/call")


if __name__ == "__main__":
    main()
