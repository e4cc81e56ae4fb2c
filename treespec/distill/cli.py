"""`treespec distill`: generate (or read) text, run the teacher pass, train drafters, write speculative.json."""
from __future__ import annotations

import argparse
from pathlib import Path


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
    llm = LLM(args.target, num_threads=args.threads, progress=True, max_num_seqs=48, max_num_batched_tokens=1024,
              device="cpu")  # the teacher pass reads fp32 CPU features
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
