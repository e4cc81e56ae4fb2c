"""How often speculative greedy output differs from plain greedy output in a low-precision dtype, and whether every
divergence sits at a near-tie of the top two logits (the honest form of "lossless" there: a tree forward and a
one-row forward round bf16 products differently).

    python benchmarks/bf16_divergence.py --device cpu --dtype bfloat16 --limit 2 --max-tokens 64

For each Spec-Bench prompt: plain greedy and n-gram speculative greedy on the same model; at the first differing
output position, the gap between the top two logits there (one forward over prompt + the common prefix, in the
model's dtype), against the median gap over the positions before it and against the bf16 spacing at that logit's
magnitude (2^-7 relative: a near-tie is a gap within one such step).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

from treespec import LLM, SamplingParams
from treespec.attention.metadata import single
from treespec.bench.dataset import load_prompts


@torch.inference_mode()
def top2_gaps(llm: LLM, ids: list[int], first: int) -> tuple[torch.Tensor, torch.Tensor]:  # -> gaps, top logits
    """Top-two logit gap and top logit at rows first.. of one forward over ids."""
    model = llm.target
    cache = model.new_cache(len(ids))
    cache.reserve(len(ids))
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), single(cache, len(ids)))[first:]
    top = model.logits(hidden).topk(2, dim=-1)
    return (top.values[:, 0] - top.values[:, 1]).cpu(), top.values[:, 0].cpu()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--limit", type=int, default=2, help="prompts per Spec-Bench category")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the per-prompt records as JSON here")
    args = ap.parse_args()
    llm = LLM(args.model, speculative_config={"method": "ngram", "budget": 8}, device=args.device, dtype=args.dtype)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    records = []
    for p in load_prompts(None, args.limit):
        ids = llm.encode_prompt(p.text, chat=True)
        (plain,) = llm.generate(ids, params, speculate=False)
        (spec,) = llm.generate(ids, params)
        k = next((i for i, (a, b) in enumerate(zip(plain.token_ids, spec.token_ids)) if a != b), None)
        rec = {"question_id": p.question_id, "category": p.category, "equal": k is None, "first_divergence": k,
               "tokens_per_step": spec.metrics["mean_tokens_per_step"]}
        if k is not None:
            gaps, tops = top2_gaps(llm, ids + plain.token_ids[:k], len(ids) - 1)
            at, before = float(gaps[-1]), gaps[:-1]
            spacing = 2.0 ** -7 * max(abs(float(tops[-1])), 1.0)
            rec |= {"gap": at, "bf16_spacing": spacing, "near_tie": at <= spacing,
                    "median_gap_before": float(before.median()) if before.numel() else math.nan}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    diverged = [r for r in records if not r["equal"]]
    print(f"\n{llm.placement.describe()}: {len(diverged)}/{len(records)} outputs differ from plain greedy within "
          f"{args.max_tokens} tokens; near-ties at the divergence: {sum(r['near_tie'] for r in diverged)}/"
          f"{len(diverged)}; gaps there: {[round(r['gap'], 4) for r in diverged]} (median gap before: "
          f"{statistics.median(r['median_gap_before'] for r in diverged) if diverged else 'n/a'})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
