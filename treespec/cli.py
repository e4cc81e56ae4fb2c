"""`treespec generate | inspect | bench | serve | distill`. Bad input prints one line and exits 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from treespec.errors import TreespecError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage + exits 2; keep it to one line
        print(f"treespec: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s}")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-270m", help="alias, HF directory or .gguf file")
    p.add_argument("--speculative-config", default=None, help="JSON, e.g. '{\"method\": \"ngram\"}'")
    p.add_argument("--ngram", action="store_true", help="shorthand for --speculative-config '{\"method\":\"ngram\"}'")
    p.add_argument("--speculative", choices=["auto", "none"], default=None,
                   help="auto: the best drafters available for the model")
    p.add_argument("--draft-model", default=None, help="shorthand for a draft_model speculative config")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=None, help="draft depth")
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument("--weight-quantization", choices=["none", "fp16", "int8"], default="none")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")


def spec_from_args(args: argparse.Namespace) -> dict | str | None:
    if args.speculative_config is not None or args.speculative is not None:
        if args.ngram or args.draft_model or (args.speculative_config is not None and args.speculative is not None):
            raise TreespecError("give one of --speculative-config, --speculative or the --ngram/--draft-model flags")
        return args.speculative_config or {"method": args.speculative}
    spec: dict[str, Any] | None = None
    if args.ngram and args.draft_model:
        spec = {"drafters": [{"method": "ngram"}, {"method": "draft_model", "model": args.draft_model}]}
    elif args.ngram:
        spec = {"method": "ngram"}
    elif args.draft_model:
        spec = {"method": "draft_model", "model": args.draft_model}
    if spec is not None and args.num_speculative_tokens:
        for d in spec.get("drafters", [spec]):
            d["num_speculative_tokens"] = args.num_speculative_tokens
    return spec


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="treespec", description="Speculative inference with token-tree verification.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    add_model_args(g)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=positive_int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print token ids, text and metrics as JSON")
    g.add_argument("--compare", action="store_true",
                   help="also run plain decoding; print tokens/s of both and whether outputs match")

    i = sub.add_parser("inspect", help="architecture, sizes, quant types, tokenizer summary")
    i.add_argument("model")

    from treespec.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from treespec.server.cli import add_serve_parser
    add_serve_parser(sub)
    from treespec.distill.cli import add_distill_parser
    add_distill_parser(sub)
    return p


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
              weight_quantization=args.weight_quantization, num_threads=args.threads, progress=True)
    ids = llm.encode_prompt(args.prompt, chat=args.chat)
    stream = not args.json

    def on_token(_r, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    runs = []
    if args.compare:
        runs.append(("plain", False))
    runs.append(("speculative" if spec else "plain", True))
    outputs = {}
    for name, speculate in runs:
        if stream and args.compare:
            print(f"--- {name} ---", flush=True)
        req = llm.engine.add_request(ids, params, speculate=speculate)
        t0 = time.perf_counter()
        from treespec.engine.emit import stream_delta
        while llm.engine.has_unfinished():
            for r in llm.engine.step():
                if stream and (delta := stream_delta(r)):
                    on_token(r, delta)
        wall = time.perf_counter() - t0
        outputs[name] = (req, wall)
        if stream:
            print(flush=True)
    if args.json:
        print(json.dumps({name: {"token_ids": r.output_ids, "text": r.text,
                                 "finish_reason": r.finish_reason.value if r.finish_reason else None,
                                 "metrics": r.metrics.as_dict(), "wall_s": round(w, 4)}
                          for name, (r, w) in outputs.items()}, indent=2))
        return 0
    _print_summary(outputs)
    return 0


def _print_summary(outputs: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="treespec generate")
    for col in ("run", "tokens", "decode tok/s", "steps", "tokens/step", "prefill s"):
        t.add_column(col, justify="right")
    rates = {}
    for name, (r, _wall) in outputs.items():
        m = r.metrics
        rates[name] = m.num_generated_tokens / m.decode_time_s if m.decode_time_s else 0.0
        t.add_row(name, str(m.num_generated_tokens), f"{rates[name]:.1f}", str(m.num_steps),
                  f"{m.mean_tokens_per_step:.2f}", f"{m.prefill_time_s:.2f}")
    console = Console(stderr=True)
    console.print(t)
    if "plain" in outputs and "speculative" in outputs:
        same = outputs["plain"][0].output_ids == outputs["speculative"][0].output_ids
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


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "inspect": cmd_inspect}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return args.handler(args)
    except TreespecError as e:
        print(f"treespec: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
