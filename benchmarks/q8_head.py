"""The exact greedy head from the default GGUF's Q8_0 blocks (kernels/q8_head.py) vs today's LMHead, side by side.

Methods, interleaved in one process on the real tied head (262144 x 640):

    lmhead    models/lm_head.LMHead.argmax: fbgemm fp16 screen (335 MB) + certified float64 rescoring
    q8        Q8Head.argmax: fused top-k over the blocks (179 MB) + the same kind of certificate
    q8-logits Q8Head.logits(h).argmax(-1): the same kernel writing all 262144 logits per row
    mm        torch.mm(W, h^T) over the dequantized fp32 head, then argmax (671 MB)

Hidden states are planted like research/lm-head.md's control: h = 25 * w_t / |w_t| + N(0, 4.6^2) (|h| ~ 119,
top-1 gaps like the real ones). Prints median ms over interleaved rounds and the per-round ratio lmhead / q8,
and checks that the answers agree. On a shared machine run with OMP_WAIT_POLICY=passive.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/q8_head.py [--rows 1 4 16] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from treespec.kernels.block_layout import dequantize_packed, pack
from treespec.kernels.q8_head import Q8Head, compiled
from treespec.models.lm_head import LMHead
from treespec.weights.gguf_file import read_gguf
from treespec.weights.loader import resolve_model


def planted_states(w: torch.Tensor, rows: int, seed: int) -> torch.Tensor:  # w: [V, D] -> [rows, D]
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, w.shape[0], (rows,), generator=g)
    u = w[t] / w[t].norm(dim=1, keepdim=True)
    return 25.0 * u + 4.6 * torch.randn(rows, w.shape[1], generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if compiled() is None:
        raise SystemExit("the head kernel cannot be built here; nothing to compare")
    gguf = read_gguf(resolve_model(args.model))
    info = next(t for t in gguf.tensors if t.name == "token_embd.weight")
    blocks = pack(gguf.raw(info), info.qtype, info.shape)
    q8 = Q8Head(blocks)
    dense = dequantize_packed(blocks)
    lm = LMHead(dense)
    lm.prepare()
    mb = dense.numel() / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; head {tuple(dense.shape)}: "
          f"q8 {q8.nbytes / 1e6:.0f} MB, fp16 screen {2 * mb:.0f} MB, fp32 {4 * mb:.0f} MB")
    methods = {"lmhead": lambda h: lm.argmax(h), "q8": lambda h: q8.argmax(h).ids,
               "q8-logits": lambda h: q8.logits(h).argmax(-1), "mm": lambda h: torch.mm(dense, h.t()).argmax(0)}
    print("| rows | " + " | ".join(methods) + " | lmhead/q8 median (min-max) | q8 certain |")
    print("|---:|" + "---:|" * len(methods) + "---|---:|")
    for t in args.rows:
        h = planted_states(dense, t, seed=t)
        answers = {n: fn(h) for n, fn in methods.items()}  # warm-up, and the agreement check
        for n, got in answers.items():
            assert torch.equal(got, answers["lmhead"]), f"{n} disagrees with lmhead at {t} rows"
        certain = int(q8.argmax(h).certain.sum())
        times: dict[str, list[float]] = {n: [] for n in methods}
        for _ in range(args.repeats):
            for n, fn in methods.items():
                start = time.perf_counter()
                fn(h)
                times[n].append(1e3 * (time.perf_counter() - start))
        ratios = [a / b for a, b in zip(times["lmhead"], times["q8"])]
        cells = " | ".join(f"{statistics.median(v):.1f}" for v in times.values())
        print(f"| {t} | {cells} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"| {certain}/{t} |", flush=True)


if __name__ == "__main__":
    main()
