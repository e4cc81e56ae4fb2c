"""Micro-benchmark of the LM head on a random Gemma-3-270M-sized head (262144 x 640): fp32 logits by F.linear and
by mm(W, h^T), the fbgemm fp16 GEMM alone, and LMHead.argmax (exact). Prints a Markdown table of median ms.

Hidden states are planted like research/lm-head.md's random-W control (h = 25 w_t/|w_t| + N(0, 4.6^2)), which
gives top-1 margins close to the real model's; the script also checks argmax against mm's argmax.

    .venv/bin/python benchmarks/lm_head.py [--vocab 262144] [--dim 640] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from treespec.models.lm_head import LMHead


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def planted_states(w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:  # w: [V, D] -> [k, D]
    rows = w[torch.randint(w.shape[0], (k,), generator=gen)]
    return 25.0 * rows / rows.norm(dim=1, keepdim=True) + 4.6 * torch.randn(k, w.shape[1], generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(args.vocab, args.dim, generator=gen) / args.dim ** 0.5
    head = LMHead(w)
    start = time.perf_counter()
    screened = head.prepare()
    print(f"threads={torch.get_num_threads()}  head {args.vocab}x{args.dim}  "
          f"prepare {time.perf_counter() - start:.1f} s  fp16 screen: {screened}\n")
    print("| k | F.linear | mm(W,h^T) | logits() | fp16 GEMM | argmax() exact | rescored rows | mismatches |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        h = planted_states(w, k, gen)
        before = head.stats.rescored
        mismatches = int((head.argmax(h) != torch.mm(w, h.t()).argmax(0)).sum())
        rescored = head.stats.rescored - before
        cols = [median_ms(lambda: F.linear(h, w), args.repeats),
                median_ms(lambda: torch.mm(w, h.t()), args.repeats),
                median_ms(lambda: head.logits(h), args.repeats),
                median_ms(lambda: head.screen(h), args.repeats) if screened else float("nan"),
                median_ms(lambda: head.argmax(h), args.repeats)]
        print(f"| {k} | " + " | ".join(f"{c:.1f}" for c in cols) + f" | {rescored}/{k} | {mismatches} |")
    print(f"\n{head.stats}")


if __name__ == "__main__":
    main()
