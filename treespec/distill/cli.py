"""`treespec distill`: generate (or read) text, run the teacher pass, train drafters, write speculative.json."""
from __future__ import annotations

import argparse
from pathlib import Path


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
    d.set_defaults(handler=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from treespec.api import LLM
    from treespec.distill.data import DataConfig, build_dataset
    from treespec.distill.train import TrainConfig, check_resume, train_drafters
    from treespec.models.truncated_head import save_token_counts
    from treespec.errors import ConfigError
    if args.threads is not None and args.threads <= 0:
        raise ConfigError(f"--threads: must be a positive integer, got {args.threads}")
    data_cfg = DataConfig(args.num_samples, args.max_tokens, args.draft_vocab, args.top_k, args.seed, args.text)
    cfg = TrainConfig(args.kind, args.layers, args.heads, args.head_dim, args.intermediate_size, args.steps,
                      args.batch_size, args.seq_len, args.lr, args.unroll, args.num_drafters, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, eval_every=args.eval_every)
    out = Path(args.out)
    ckpt = check_resume(out, cfg) if args.resume else None  # fail before loading the model
    # generation batches many requests (the engine's defaults are tuned for serving latency)
    llm = LLM(args.target, num_threads=args.threads, progress=True, max_num_seqs=48, max_num_batched_tokens=1024)
    if ckpt is not None and ckpt.data != data_cfg.key(str(llm.checkpoint_source)):
        raise ConfigError("--resume: the checkpoint was trained on a dataset built with other arguments")
    data = build_dataset(llm, data_cfg, out)
    # the text's token counts: a draft vocabulary for self-speculation ("draft_vocab_counts" of layer_skip)
    save_token_counts(out / "token_counts.json", data.tokens, llm.target.config.vocab_size)
    result = train_drafters(llm.target, data, cfg, out, resume=args.resume, target_name=args.target)
    _print_summary(data, result)
    return 0


def _print_summary(data, result) -> None:
    s = data.stats
    if s.get("text_s"):
        print(f"data: {s['sequences']} sequences, {s['tokens']} tokens; text {s['text_s']:.1f} s "
              f"({s['tokens'] / s['text_s']:.0f} tok/s), teacher pass {s['teacher_s']:.1f} s")
    for k, d in enumerate(result.drafters):
        start = " ".join(f"{a:.3f}" for a in d.acceptance_start)
        end = " ".join(f"{a:.3f}" for a in d.acceptance)
        print(f"drafter-{k}: {d.steps} steps in {d.wall_s:.1f} s ({d.rows_per_s:.0f} rows/s); held-out acceptance "
              f"per pass {start} -> {end}; {d.size_bytes / 1e6:.2f} MB at {d.path}")
    print(f"wrote {result.spec_path}")
