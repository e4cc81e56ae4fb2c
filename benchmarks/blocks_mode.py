"""weight_quantization 'none' (dequantized fp32) vs 'blocks' on one GGUF, both loaded in one process and run
interleaved prompt by prompt: plain greedy and n-gram tokens/s on Spec-Bench prompts (completion form,
bench/prompt_form.py, unless --chat), and whether blocks' greedy output equals fp32's. At a difference it prints
both models' top two logits after the common prefix: a near-tie (a gap near fp32 summation noise) explains it, a
wide gap would be a bug.

    OMP_WAIT_POLICY=passive PYTHONPATH=. .venv/bin/python benchmarks/blocks_mode.py \\
        [--limit 3] [--max-tokens 96] [--dataset F] [--threads 2] [--chat]
"""
from __future__ import annotations

import argparse

import torch

from treespec.api import LLM
from treespec.attention.metadata import SeqAttention
from treespec.bench.dataset import load_prompts
from treespec.bench.prompt_form import PromptForm, encode
from treespec.bench.spec_bench import RunRecord, run_methods, summarize
from treespec.sampling import SamplingParams

MODES = ("none", "blocks")
METHODS: dict[str, dict | None] = {"plain": None, "ngram": {"method": "ngram"}}


@torch.inference_mode()
def top_two(llm: LLM, ids: list[int]) -> list[tuple[int, float]]:
    """(token, fp32 logit) of the two best next tokens after ids, from one prefill forward."""
    model = llm.target
    cache = model.new_cache(len(ids) + 1)
    cache.reserve(len(ids))
    h = model(torch.tensor(ids), torch.arange(len(ids)), [SeqAttention(cache=cache, start=0, n=len(ids))])
    vals, toks = model.logits(h[-1:])[0].topk(2)
    return [(int(t), float(v)) for t, v in zip(toks, vals)]


def compare_outputs(llms: dict[str, LLM], prompts: list[list[int]], plain: dict[str, list[RunRecord]]) -> None:
    equal = 0
    for ids, a, b in zip(prompts, plain["none"], plain["blocks"]):
        if a.token_ids == b.token_ids:
            equal += 1
            continue
        i = next((k for k, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                 min(len(a.token_ids), len(b.token_ids)))
        prefix = ids + a.token_ids[:i]
        tops = {m: top_two(llms[m], prefix) for m in MODES}
        gap = tops["none"][0][1] - tops["none"][1][1]
        print(f"  {a.question_id}: first difference at token {i}: fp32 {a.token_ids[i:i + 1]}, blocks "
              f"{b.token_ids[i:i + 1]}; top two fp32 {tops['none']}, blocks {tops['blocks']}; fp32 gap {gap:.2e}")
    print(f"blocks greedy == fp32 greedy: {equal}/{len(prompts)} prompts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dataset", default=None, help="JSONL with 'turns' or 'prompt' (default: shipped Spec-Bench)")
    ap.add_argument("--limit", type=int, default=3, help="prompts per Spec-Bench category")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chat", action="store_true", help="prompts through the chat template")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llms = {m: LLM(args.model, weight_quantization=m, num_threads=args.threads) for m in MODES}
    prompts = load_prompts(args.dataset, args.limit)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    form = PromptForm.CHAT if args.chat else PromptForm.COMPLETION
    records: dict[str, list[RunRecord]] = {m: [] for m in MODES}
    for n, p in enumerate(prompts):
        for m in MODES:  # interleaved, so both modes see the same machine load
            records[m] += run_methods(llms[m], METHODS, [p], params, form, progress=False)
        print(f"prompt {n + 1}/{len(prompts)} done", flush=True)
    summary = {m: summarize(records[m]) for m in MODES}
    print(f"\n{args.model}, {len(prompts)} prompts, {args.max_tokens} tokens, {form.value} "
          f"form, {args.threads} threads, greedy")
    print("| method | fp32 tok/s | blocks tok/s | blocks / fp32 | tokens/step fp32 / blocks | == plain fp32 / blocks |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        a, b = summary["none"][method]["overall"], summary["blocks"][method]["overall"]
        print(f"| {method} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
              f"x{b['tokens_per_s'] / a['tokens_per_s']:.2f} | {a['tokens_per_step']} / {b['tokens_per_step']} | "
              f"{a['equal'] or '-'} / {b['equal'] or '-'} |")
    ngram_vs_plain = summary["blocks"]["ngram"]["overall"]["tokens_per_s"] / summary["none"]["plain"]["overall"][
        "tokens_per_s"]
    print(f"blocks + ngram vs fp32 plain: x{ngram_vs_plain:.2f}")
    ids = [encode(llms["none"], p, form) for p in prompts]
    compare_outputs(llms, ids, {m: [r for r in records[m] if r.method == "plain"] for m in MODES})
    print("head rows decided from the Q8_0 blocks:", llms["blocks"].target.lm_head.stats)


if __name__ == "__main__":
    main()
