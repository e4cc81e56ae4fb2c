"""The exact greedy head's paths over the default GGUF's Q8_0 head, side by side (kernels/q8_head.py,
kernels/bf16_screen.py, models/lm_head.py).

Methods, interleaved in one process on the real tied head (262144 x 640):

    fp16      LMHead.argmax without blocks: fbgemm fp16 screen (335 MB) + certified float64 rescoring
    q8        Q8Head.argmax: fused top-k over the blocks (179 MB) + the same kind of certificate
    bf16      LMHead.argmax through the AVX512_BF16 screen over the blocks (179 MB) + rescoring (where the CPU has
              it; forced for every row count: LMHead takes it from WIDE_SCREEN_FROM_ROWS rows)
    mm        torch.mm(W, h^T) over the dequantized fp32 head, then argmax (671 MB; --mm)

Hidden states: --states planted (default) plants them like research/lm-head.md's control: h = 25 * w_t / |w_t| +
N(0, 4.6^2) (|h| ~ 119, top-1 gaps like the real ones); --states real records the final hidden states the head
sees while the default model (LLM, blocks mode, n-gram trees) completes "Question: ...\\nAnswer:" prompts, and
takes the first T of them. Prints median ms over interleaved rounds, checks that the answers agree, and counts
the rows the bf16 screen had to rescore (more than one candidate) and the candidates. On a shared machine run
with OMP_WAIT_POLICY=passive, or time one thread's CPU time (--threads 1 --clock thread).

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/q8_head.py [--rows 1 4 8 16] [--states real]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from treespec.kernels import bf16_screen
from treespec.kernels.block_layout import dequantize_packed, pack
from treespec.kernels.q8_head import Q8Head, compiled
from treespec.models.lm_head import LMHead
from treespec.weights.gguf_file import read_gguf
from treespec.weights.loader import resolve_model

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "How do plants make food?",
             "Who wrote Hamlet?", "What is 12 times 12?", "How does a refrigerator work?"]


def planted_states(w: torch.Tensor, rows: int, seed: int) -> torch.Tensor:  # w: [V, D] -> [rows, D]
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, w.shape[0], (rows,), generator=g)
    u = w[t] / w[t].norm(dim=1, keepdim=True)
    return 25.0 * u + 4.6 * torch.randn(rows, w.shape[1], generator=g)


def real_states(model: str, rows: int) -> torch.Tensor:  # -> [>= rows, D]
    """Hidden states the default model's head is asked about during speculative greedy completion."""
    from treespec import LLM, SamplingParams
    llm = LLM(model, speculative_config={"method": "ngram"})
    head = llm.target.lm_head
    seen: list[torch.Tensor] = []
    argmax = head.argmax
    head.argmax = lambda h, screened=None: (seen.append(h.detach().clone()), argmax(h, screened))[1]
    for q in QUESTIONS:
        llm.generate(f"Question: {q}\nAnswer:", SamplingParams(temperature=0.0, max_tokens=24))
        if sum(s.shape[0] for s in seen) >= rows:
            break
    return torch.cat(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--states", choices=("planted", "real"), default="planted")
    parser.add_argument("--mm", action="store_true", help="also time the dequantized fp32 mm")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="thread: CPU time of this thread (with --threads 1: immune to other load)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
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
    methods = {"fp16": lambda h: lm.argmax(h), "q8": lambda h: q8.argmax(h).ids}
    screen = bf16_screen.Bf16Screen.build(q8)
    bf16 = LMHead(dense)
    if screen is not None:
        bf16.use_blocks_head(q8, screen)
        bf16.wide_screen_from_rows = 1
        methods["bf16"] = lambda h: bf16.argmax(h)
    if args.mm:
        methods["mm"] = lambda h: torch.mm(dense, h.t()).argmax(0)
    states = real_states(args.model, max(args.rows)) if args.states == "real" else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; head {tuple(dense.shape)}: q8 and bf16 "
          f"{q8.nbytes / 1e6:.0f} MB, fp16 screen {2 * dense.numel() / 1e6:.0f} MB; {args.states} hidden states, "
          f"{args.clock} clock")
    print("| rows | " + " | ".join(methods) + " | fp16/bf16 | q8/bf16 | bf16 rescored rows (candidates) |")
    print("|---:|" + "---:|" * len(methods) + "---:|---:|---:|")
    for t in args.rows:
        h = planted_states(dense, t, seed=t) if states is None else states[:t].contiguous()
        answers = {n: fn(h) for n, fn in methods.items()}  # warm-up, and the agreement check
        for n, got in answers.items():
            assert torch.equal(got, answers["fp16"]), f"{n} disagrees with fp16 at {t} rows"
        before = (bf16.stats.rescored, bf16.stats.candidates)  # only bf16 runs through that head
        times: dict[str, list[float]] = {n: [] for n in methods}
        for _ in range(args.repeats):
            for n, fn in methods.items():
                start = clock()
                fn(h)
                times[n].append(1e3 * (clock() - start))
        cells = " | ".join(f"{statistics.median(v):.1f}" for v in times.values())
        if screen is None:
            print(f"| {t} | {cells} | - | - | - |", flush=True)
            continue
        ratios = [statistics.median(a / b for a, b in zip(times[n], times["bf16"])) for n in ("fp16", "q8")]
        rescored = (bf16.stats.rescored - before[0]) / args.repeats
        candidates = (bf16.stats.candidates - before[1]) / args.repeats
        print(f"| {t} | {cells} | {ratios[0]:.2f}x | {ratios[1]:.2f}x | {rescored:.0f}/{t} ({candidates:.0f}) |",
              flush=True)


if __name__ == "__main__":
    main()
