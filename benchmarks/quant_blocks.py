"""Block kernel vs fp32 over the default GGUF's own tensors: ms per token-step for Gemma 3 270M's body (18 layers of
q/k/v/o/gate/up/down in their file types, or the model's fused qkv/gate_up with --fused) and its tied Q8_0 head
(262144 x 640), at several row counts. Methods run interleaved in one process, so ratios are side by side:

    block   treespec.kernels.block_mm over the repacked blocks (int8 codes + per-group scales)
    mm      torch.mm(W, x^T) over the dequantized fp32 weights
    linear  treespec's Linear today (mm for 1-2 rows, oneDNN's pre-packed product for 3+; body only)

Prints median ms over --repeats rounds and, per row count, the spread of the per-round ratio mm / block.
On a shared machine run it with OMP_WAIT_POLICY=passive: spinning OpenMP workers fighting other processes
otherwise swing the body's 126 short parallel products by 10x either way.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/quant_blocks.py [--rows 1 4 16 64] [--repeats 7] [--fused] [--no-head] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from treespec.kernels.block_layout import PackedBlocks, concat_rows, dequantize_packed, pack, packable
from treespec.kernels.block_mm import block_mm, compiled
from treespec.models.layers import Linear
from treespec.weights.gguf_file import read_gguf
from treespec.weights.loader import resolve_model

BODY = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FUSED = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


def body_blocks(path: str, fused: bool) -> list[PackedBlocks]:
    gguf = read_gguf(resolve_model(path))
    infos = {t.name: t for t in gguf.tensors}
    n_layers = 1 + max(int(n.split(".")[1]) for n in infos if n.startswith("blk."))
    groups = FUSED if fused else tuple((name,) for name in BODY)
    out = []
    for i in range(n_layers):
        for group in groups:
            parts = [infos[f"blk.{i}.{name}.weight"] for name in group]
            assert all(packable(p.qtype) for p in parts), [p.qtype.name for p in parts]
            out.append(concat_rows([pack(gguf.raw(p), p.qtype, p.shape) for p in parts]))
    return out


def head_blocks(path: str) -> PackedBlocks:
    gguf = read_gguf(resolve_model(path))
    info = next(t for t in gguf.tensors if t.name == "token_embd.weight")
    return pack(gguf.raw(info), info.qtype, info.shape)


def linear_of(w: torch.Tensor) -> Linear:
    lin = Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    lin.pack()
    return lin


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def run(title: str, methods: dict[str, Callable[[int], Callable[[], object]]], rows: list[int], repeats: int) -> None:
    print(f"\n{title}: median ms per step ({repeats} interleaved rounds); ratio = mm / block per round")
    names = list(methods)
    print("| rows | " + " | ".join(names) + " | mm/block median (min-max) |")
    print("|---:|" + "---:|" * len(names) + "---|")
    for t in rows:
        fns = {n: make(t) for n, make in methods.items()}
        for fn in fns.values():
            fn()  # warm up: first-call costs, page faults
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(repeats):
            for n in names:
                times[n].append(timed(fns[n]))
        ratios = [m / b for m, b in zip(times["mm"], times["block"])]
        cells = " | ".join(f"{statistics.median(times[n]):.1f}" for n in names)
        print(f"| {t} | {cells} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fused", action="store_true", help="the model's fused qkv and gate_up projections")
    parser.add_argument("--no-head", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if compiled() is None:
        raise SystemExit("the block kernel cannot be built here; nothing to compare")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")

    body = body_blocks(args.model, args.fused)
    dense = [dequantize_packed(b) for b in body]
    linears = [linear_of(w) for w in dense]
    print(f"body: {len(body)} matrices, {sum(b.nbytes for b in body) / 1e6:.0f} MB as blocks, "
          f"{sum(w.numel() * 4 for w in dense) / 1e6:.0f} MB as fp32")

    def inputs(t: int, widths: list[int]) -> dict[int, torch.Tensor]:
        return {k: torch.randn(t, k) for k in set(widths)}

    def body_method(step: Callable[[torch.Tensor, int], object]) -> Callable[[int], Callable[[], object]]:
        def make(t: int) -> Callable[[], object]:
            xs = inputs(t, [b.shape[1] for b in body])
            return lambda: [step(xs[b.shape[1]], i) for i, b in enumerate(body)]
        return make

    run("body", {"block": body_method(lambda x, i: block_mm(x, body[i])),
                 "mm": body_method(lambda x, i: torch.mm(dense[i], x.t())),
                 "linear": body_method(lambda x, i: linears[i](x))}, args.rows, args.repeats)
    del dense, linears
    if args.no_head:
        return
    head = head_blocks(args.model)
    head_dense = dequantize_packed(head)
    print(f"\nhead: {head.shape[0]} x {head.shape[1]}, {head.nbytes / 1e6:.0f} MB as blocks, "
          f"{head_dense.numel() * 4 / 1e6:.0f} MB as fp32")

    def head_method(step: Callable[[torch.Tensor], object]) -> Callable[[int], Callable[[], object]]:
        def make(t: int) -> Callable[[], object]:
            x = torch.randn(t, head.shape[1])
            return lambda: step(x)
        return make

    run("head (all logits)", {"block": head_method(lambda x: block_mm(x, head)),
                              "mm": head_method(lambda x: torch.mm(head_dense, x.t()))}, args.rows, args.repeats)


if __name__ == "__main__":
    main()
