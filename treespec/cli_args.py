"""The CLI's arguments: one parser for every subcommand, shared flags and their parsing into configs.

It imports no command module, so the commands import it (and each other) without cycles, and building the parser
needs no optional package.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from treespec.bench.prompt_form import PromptForm
from treespec.config import ExecutorBackend, WeightQuantization
from treespec.device import DType, Kernels, resolve_device
from treespec.errors import ConfigError, TreespecError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints usage + exits 2; keep it to one line
        print(f"treespec: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


API_KEY_ENV = "TREESPEC_API_KEY"  # serve's default --api-key

METHOD_SHORTHANDS = {  # bench --method NAME
    "ngram": {"method": "ngram"},
    "auto": {"method": "auto"},
    "layer_skip": {"method": "layer_skip", "draft_vocab_size": 32768},
}


def build_parser() -> argparse.ArgumentParser:
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

    add_bench_parser(sub)
    add_serve_parser(sub)
    add_distill_parser(sub)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-270m", help="alias, HF directory or .gguf file")
    p.add_argument("--speculative-config", default=None, help="JSON, e.g. '{\"method\": \"ngram\"}'")
    p.add_argument("--ngram", action="store_true", help="shorthand for --speculative-config '{\"method\":\"ngram\"}'")
    p.add_argument("--speculative", choices=["auto", "none"], default=None,
                   help="auto: the best drafters available for the model")
    p.add_argument("--draft-model", default=None, help="shorthand for a draft_model speculative config")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=None, help="draft depth")
    p.add_argument("--max-model-len", type=positive_int, default=None)
    add_weight_quantization(p)
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (per rank)")
    add_parallel_args(p)
    add_device_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                   help="ranks splitting every layer (Megatron); rank 0 drafts and verifies")
    p.add_argument("--pipeline-parallel-size", "-pp", type=positive_int, default=1,
                   help="ranks holding consecutive stages of the layers")
    p.add_argument("--distributed-executor-backend", choices=[b.value for b in ExecutorBackend], default="mp",
                   help="mp: spawn the ranks on this node (default); ray: place them with a Ray placement group; "
                        "external_launcher: every rank started by torchrun")


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LLM keyword arguments of add_parallel_args's and add_device_args's flags: where the model runs."""
    return {"tensor_parallel_size": args.tensor_parallel_size, "pipeline_parallel_size": args.pipeline_parallel_size,
            "distributed_executor_backend": args.distributed_executor_backend,
            "device": args.device, "dtype": args.dtype, "kernels": args.kernels}


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_arg, default="auto",
                   help="cpu | cuda | cuda:N | auto (default: CUDA when torch sees one)")
    p.add_argument("--dtype", choices=[d.value for d in DType], default="auto",
                   help="weights and activations (default auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--kernels", choices=[k.value for k in Kernels], default="auto",
                   help="cpu: the fp32 CPU fast paths; portable: plain torch ops (what CUDA runs); auto: cpu for "
                        "fp32 on the CPU, else portable")


def device_arg(s: str) -> str:
    """A device treespec takes and this machine has: checked while parsing, so a server never starts without it."""
    try:
        resolve_device(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device: ")) from None
    return s


def add_weight_quantization(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weight-quantization", choices=[m.value for m in WeightQuantization], default="auto",
                   help="auto (default): blocks for a GGUF, none for a Hugging Face directory; none: fp32 (exact); "
                        "blocks: a GGUF's quantized weights used as they are stored (exact, less memory traffic); "
                        "fp16, int8: approximate")


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: Spec-Bench (spec), plain decoding vs HF (ar), server load (serve)")
    b.add_argument("--mode", choices=["spec", "ar", "serve"], default="spec")
    b.add_argument("--model", default="gemma-3-270m")
    b.add_argument("--method", action="append", default=None,
                   help="name=JSON speculative config or a shorthand (ngram); repeatable")
    b.add_argument("--dataset", default=None, help="JSONL with 'turns' or 'prompt' (default: shipped Spec-Bench)")
    b.add_argument("--limit", type=int, default=10, help="prompts per category")
    b.add_argument("--max-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0, help="spec mode: 0 = greedy (default), else sampled")
    b.add_argument("--seed", type=int, default=0, help="spec mode: sampling seed of every request")
    b.add_argument("--prompt-form", choices=[f.value for f in PromptForm], default="auto",
                   help="chat: through the chat template; completion: 'Question: ...\\nAnswer:' text to continue; "
                        "auto (default): chat only for a checkpoint with its own chat template, not named a base model")
    b.add_argument("--no-chat", action="store_true", help="alias of --prompt-form completion")
    b.add_argument("--threads", type=int, default=None)
    add_weight_quantization(b)
    add_parallel_args(b)
    add_device_args(b)
    b.add_argument("--out", default="bench_out", help="folder for results.json, results.md, speedup.png")
    b.add_argument("--concurrency", default="1,4,16", help="serve mode: comma-separated client counts")


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    s.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    s.add_argument("--max-num-seqs", type=positive_int, default=16, help="requests running at once")
    s.add_argument("--max-num-batched-tokens", type=positive_int, default=512, help="per-step token budget")
    s.add_argument("--max-waiting", type=non_negative_int, default=256,
                   help="requests that may wait for a running slot; beyond it they get 429")
    s.add_argument("--drain-timeout", type=seconds, default=30.0,
                   help="seconds in-flight requests get on SIGTERM/SIGINT; then they end with finish_reason abort")
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest accepted request body")
    s.add_argument("--cors-origin", action="append", default=None, help="allow this CORS origin (repeatable)")
    s.add_argument("--data-parallel-size", type=positive_int, default=1,
                   help="K engines behind this endpoint as a Ray Serve application (the 'distributed' extra); "
                        "1: this process serves alone")
    s.add_argument("--ray-address", default=None,
                   help="Ray cluster for the replicas (default: $RAY_ADDRESS, else a local cluster of this "
                        "machine's CPUs, stopped on exit)")
    s.add_argument("--cpus-per-rank", type=positive_float, default=None,
                   help="with --data-parallel-size: Ray CPUs each rank of a replica reserves (default: --threads); "
                        "less than --threads lets more ranks than cores share a node")


def add_distill_parser(sub) -> None:
    d = sub.add_parser("distill", help="train learned drafters (EAGLE-style head or small LM) on the target's own text")
    d.add_argument("--target", required=True, help="the target: alias, HF directory or .gguf file")
    d.add_argument("--kind", required=True, choices=["head", "ssm"],
                   help="head: reads the target's features (EAGLE); ssm: a small LM over tokens only")
    d.add_argument("--out", required=True, help="folder for the dataset, checkpoints, drafter-k/ and speculative.json")
    d.add_argument("--text", default=None, help="a local UTF-8 text file to train on instead of generated text")
    d.add_argument("--num-samples", type=int, default=512, help="sequences the target generates")
    d.add_argument("--max-tokens", type=int, default=256, help="tokens per generated sequence (or --text piece)")
    d.add_argument("--draft-vocab", type=int, default=32768, help="output rows: the N most frequent tokens")
    d.add_argument("--top-k", type=int, default=8, help="target probabilities kept per training row")
    d.add_argument("--layers", type=int, default=1, help="decoder blocks of the drafter")
    d.add_argument("--heads", type=int, default=None, help="attention heads (default: the target's)")
    d.add_argument("--head-dim", type=int, default=None, help="(default: the target's)")
    d.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: the target's)")
    d.add_argument("--steps", type=int, default=2000, help="optimizer steps per drafter")
    d.add_argument("--batch-size", type=int, default=8, help="windows per step")
    d.add_argument("--seq-len", type=int, default=256, help="rows per window")
    d.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    d.add_argument("--unroll", type=int, default=3, help="unrolled draft levels trained per step (heads)")
    d.add_argument("--num-drafters", type=int, default=1, help="drafters trained by collective boost-tuning")
    d.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    d.add_argument("--threads", type=int, default=None, help="torch threads")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    d.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations")


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def seconds(s: str) -> float:
    """A finite, non-negative number of seconds (float() alone lets -1, nan and inf through)."""
    v = float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {s}")
    return v


def non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {s}")
    return v


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


def parse_methods(items: list[str] | None) -> dict[str, dict | None]:
    methods: dict[str, dict | None] = {"plain": None}
    for item in items or ["ngram"]:
        name, _, raw = item.partition("=")
        if raw:
            try:
                methods[name] = json.loads(raw)
            except json.JSONDecodeError:
                raise ConfigError(f"--method {name}: not valid JSON") from None
        elif item in METHOD_SHORTHANDS:
            methods[item] = METHOD_SHORTHANDS[item]
        else:
            raise ConfigError(f"--method {item!r}: use a shorthand ({', '.join(METHOD_SHORTHANDS)}) or name=JSON")
    return methods
