"""`treespec generate | inspect | bench | serve | distill`. Bad input prints one line and exits 2, never a traceback.

The entry point boundary: commands that need an optional extra check for it here, before importing their module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Callable

from treespec.cli_args import EXIT_USAGE, build_parser, load_kwargs, spec_from_args
from treespec.errors import TreespecError
from treespec.extras import Extra, require

if TYPE_CHECKING:
    from treespec.api import RequestOutput


def cmd_generate(args: argparse.Namespace) -> int:
    from treespec.api import LLM
    from treespec.sampling import SamplingParams
    if not args.prompt:
        raise TreespecError("prompt: is empty")
    spec = spec_from_args(args)
    if args.compare and spec is None:
        spec = {"method": "ngram"}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, speculative_config=spec, max_model_len=args.max_model_len,
              weight_quantization=args.weight_quantization, num_threads=args.threads, progress=True,
              **load_kwargs(args))
    ids = llm.encode_prompt(args.prompt, chat=args.chat)
    stream = not args.json

    def on_token(_r, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    runs = [("plain", False)] if args.compare else []
    runs.append(("speculative" if spec else "plain", True))
    outputs: dict[str, tuple[RequestOutput, float]] = {}
    for name, speculate in runs:
        if stream and args.compare:
            print(f"--- {name} ---", flush=True)
        t0 = time.perf_counter()
        (out,) = llm.generate(ids, params, on_token=on_token if stream else None, speculate=speculate)
        outputs[name] = (out, time.perf_counter() - t0)
        if stream:
            print(flush=True)
    if args.json:
        print(json.dumps({name: {"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason,
                                 "metrics": o.metrics, "wall_s": round(w, 4)}
                          for name, (o, w) in outputs.items()}, indent=2))
        return 0
    _print_summary(outputs)
    return 0


def _print_summary(outputs: dict[str, tuple[RequestOutput, float]]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="treespec generate")
    for col in ("run", "tokens", "decode tok/s", "steps", "tokens/step", "prefill s"):
        t.add_column(col, justify="right")
    rates = {}
    for name, (out, _wall) in outputs.items():
        m = out.metrics
        rates[name] = m["num_generated_tokens"] / m["decode_time_s"] if m["decode_time_s"] else 0.0
        t.add_row(name, str(m["num_generated_tokens"]), f"{rates[name]:.1f}", str(m["num_steps"]),
                  f"{m['mean_tokens_per_step']:.2f}", f"{m['prefill_time_s']:.2f}")
    console = Console(stderr=True)
    console.print(t)
    if "plain" in outputs and "speculative" in outputs:
        same = outputs["plain"][0].token_ids == outputs["speculative"][0].token_ids
        ratio = rates["speculative"] / rates["plain"] if rates["plain"] else 0.0
        console.print(f"speedup x{ratio:.2f} over plain decoding; outputs identical: {'yes' if same else 'NO'}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from treespec.weights.loader import load_checkpoint
    ckpt = load_checkpoint(args.model, progress=True)
    n_params = sum(t.numel() for t in ckpt.tensors.values())
    cfg = ckpt.config
    info = {
        "source": str(ckpt.source),
        "model_type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"), "hidden_size": cfg.get("hidden_size"),
        "heads": cfg.get("num_attention_heads"), "kv_heads": cfg.get("num_key_value_heads"),
        "vocab_size": cfg.get("vocab_size"), "context_length": cfg.get("max_position_embeddings"),
        "parameters": n_params, "fp32_bytes": n_params * 4,
        "quant_types": ckpt.quant_types,
        "tokenizer": {"vocab_size": ckpt.tokenizer.vocab_size, "bos_id": ckpt.tokenizer.bos_id,
                      "eos_ids": sorted(ckpt.tokenizer.eos_ids)},
    }
    print(json.dumps(info, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    require(Extra.BENCH, "treespec bench")
    if args.mode == "serve":
        require(Extra.SERVE, "treespec bench --mode serve")
    from treespec.bench.cli import cmd_bench
    return cmd_bench(args)


def _serve(args: argparse.Namespace) -> int:
    require(Extra.SERVE, "treespec serve")
    if args.data_parallel_size > 1:
        # read when Ray is first imported: its C++ failure-signal handler would print a stack for the SIGTERM that
        # starts our drain and end the process with an abort (status -6) once the drain is done
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        require(Extra.DISTRIBUTED, "treespec serve --data-parallel-size")
    from treespec.server.cli import cmd_serve
    return cmd_serve(args)


def _distill(args: argparse.Namespace) -> int:
    from treespec.distill.cli import cmd_distill
    return cmd_distill(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": cmd_generate, "inspect": cmd_inspect, "bench": _bench, "serve": _serve, "distill": _distill}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TreespecError as e:
        print(f"treespec: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
