"""torch.compile (inductor) of the one-row decode forward on the CPU, side by side with eager, in one process.

    python benchmarks/compile_decode.py --steps 48 --rounds 4 [--variant compile_freezing_cpp]

The target's layer stack (no head: the head's fp16 screen is an fbgemm op) over one token after a prompt, with the
CPU kernels, fp32. Eager against one variant: torch.compile (inductor, dynamic shapes: the cache grows a slot per
step), or the same with inductor's freezing and C++ wrapper. Every variant decodes the same teacher-forced tokens in its own
cache; rounds interleave the variants so machine noise hits them alike. Prints ms per step (median over rounds)
and whether the compiled hidden states equal eager's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from treespec import LLM
from treespec.attention.metadata import single
from treespec.engine.cost_model import CALIBRATION_TEXT


def compiled(forward, variant: str):
    """torch.compile of `forward` (one compiled variant per process: dynamo caches compiled frames per code object,
    so two variants of one function in one process would share them)."""
    import torch._inductor.config as inductor
    fn = torch.compile(forward, dynamic=True)
    if variant == "compile":
        return fn

    def frozen(*a):
        with inductor.patch(freezing=True, cpp_wrapper=True):
            return fn(*a)
    return frozen


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--steps", type=int, default=48, help="decode steps per variant per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variant", choices=["compile", "compile_freezing_cpp"], default="compile")
    args = ap.parse_args()
    llm = LLM(args.model, device="cpu", num_threads=args.threads)
    model = llm.target
    text = llm.tokenizer.encode(CALIBRATION_TEXT)
    prompt, follow = text[:64], (text * 8)[64:64 + args.steps * (args.rounds + 1)]
    fns = {"eager": model.forward, args.variant: compiled(model.forward, args.variant)}
    caches, results, errors = {}, {name: [] for name in fns}, {}
    for name in fns:
        cache = caches[name] = model.new_cache(len(prompt) + len(follow) + 1)
        cache.reserve(len(prompt))
        model(torch.tensor(prompt), torch.arange(len(prompt)), single(cache, len(prompt)))
        cache.commit()
    hidden: dict[str, list[torch.Tensor]] = {name: [] for name in fns}
    for r in range(args.rounds + 1):  # round 0 warms up (compiles)
        for name, fn in fns.items():
            if name in errors:
                continue
            cache = caches[name]
            t = time.perf_counter()
            try:
                for tok in follow[r * args.steps:(r + 1) * args.steps]:
                    cache.reserve(1)
                    h = fn(torch.tensor([tok]), torch.tensor([cache.length]), single(cache, 1))
                    cache.commit()
                    if r == args.rounds:
                        hidden[name].append(h)
            except Exception as e:  # noqa: BLE001 - a variant that cannot compile is reported, not fatal
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            if r:
                results[name].append(1e3 * (time.perf_counter() - t) / args.steps)
    report = {"model": args.model, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "ms_per_step": {n: statistics.median(v) for n, v in results.items() if v},
              "per_round": results, "errors": errors,
              "equal_to_eager": {n: all(torch.equal(a, b) for a, b in zip(hidden["eager"], hidden[n]))
                                 for n in fns if n != "eager" and hidden[n]},
              "max_abs_diff": {n: max(float((a - b).abs().max()) for a, b in zip(hidden["eager"], hidden[n]))
                               for n in fns if n != "eager" and hidden[n]}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
