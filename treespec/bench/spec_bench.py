"""Spec-Bench protocol: plain decoding and each method on the same prompts in one process, batch 1.

Per (method, prompt): decode tokens/s (time after prefill), target steps, mean tokens/step and whether the
output equals plain decoding's. Speedup = method tokens/s over plain tokens/s, per category and overall
(overall uses total tokens / total decode time, as Spec-Bench does).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from tqdm import tqdm

from treespec.api import LLM
from treespec.bench.dataset import BenchPrompt
from treespec.bench.prompt_form import PromptForm, encode
from treespec.sampling import SamplingParams


@dataclass
class RunRecord:
    method: str
    question_id: str
    category: str
    num_tokens: int
    decode_s: float
    wall_s: float
    steps: int
    accepted: int
    equal_to_plain: bool | None
    token_ids: list[int]

    def as_dict(self) -> dict:
        return asdict(self)


def run_methods(llm: LLM, methods: dict[str, dict | None], prompts: list[BenchPrompt], params: SamplingParams,
                form: PromptForm, progress: bool = True) -> list[RunRecord]:
    """methods: name -> speculative config (None = plain). 'plain' is always run first as the reference.
    form: CHAT or COMPLETION (resolve AUTO first: bench/prompt_form.py)."""
    engines = {name: llm.make_engine(spec) for name, spec in methods.items()}
    records: list[RunRecord] = []
    bar = tqdm(total=len(prompts) * len(engines), desc="bench", disable=not progress)
    for p in prompts:
        ids = encode(llm, p, form)
        plain_ids: list[int] | None = None
        for name, engine in engines.items():
            req = engine.add_request(ids, params)
            t0 = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            wall = time.perf_counter() - t0
            m = req.metrics
            if name == "plain":
                plain_ids = list(req.output_ids)
            equal = None if name == "plain" or plain_ids is None else req.output_ids == plain_ids
            records.append(RunRecord(name, p.question_id, p.category, len(req.output_ids), m.decode_time_s, wall,
                                     m.num_steps, m.num_accepted_tokens, equal, list(req.output_ids)))
            bar.update(1)
            bar.set_postfix(method=name, tps=f"{len(req.output_ids) / max(m.decode_time_s, 1e-9):.1f}")
    bar.close()
    return records


def summarize(records: list[RunRecord]) -> dict[str, dict[str, dict]]:
    """method -> category (and 'overall') -> tokens/s, speedup, tokens/step, equal count."""
    out: dict[str, dict[str, dict]] = {}
    cats = sorted({r.category for r in records})
    for method in dict.fromkeys(r.method for r in records):
        out[method] = {}
        for cat in cats + ["overall"]:
            rs = [r for r in records if r.method == method and (cat == "overall" or r.category == cat)]
            base = [r for r in records if r.method == "plain" and (cat == "overall" or r.category == cat)]
            if not rs:
                continue
            tps = sum(r.num_tokens for r in rs) / max(sum(r.decode_s for r in rs), 1e-9)
            base_tps = sum(r.num_tokens for r in base) / max(sum(r.decode_s for r in base), 1e-9) if base else 0.0
            steps = sum(r.steps for r in rs)
            out[method][cat] = {
                "prompts": len(rs),
                "tokens_per_s": round(tps, 3),
                "speedup": round(tps / base_tps, 3) if base_tps else None,
                "tokens_per_step": round(1 + sum(r.accepted for r in rs) / steps, 3) if steps else None,
                "equal": sum(1 for r in rs if r.equal_to_plain) if method != "plain" else None,
            }
    return out
