"""`treespec bench --mode ar`: treespec's plain decoding (and any --method) side by side with llama.cpp (when
llama-cpp-python is installed) and HF transformers, prompt by prompt in one process, plus the roofline."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from treespec.api import LLM
from treespec.bench.ar import ArResult, build_hf_model, run_hf, run_treespec
from treespec.bench.llamacpp import Agreement, load_llama_cpp, run_llama_cpp


@dataclass
class ArComparison:
    treespec: list[ArResult]                     # plain first, then each --method
    llama_cpp: ArResult | None
    llama_cpp_note: str                           # its version and threads, or why it is absent
    hf: ArResult | None = None
    agreement: dict[str, Agreement] = field(default_factory=dict)  # treespec run -> vs llama.cpp's tokens
    exact: dict[str, Agreement] = field(default_factory=dict)      # each --method's run -> vs treespec plain's

    def markdown(self) -> str:
        base = self.llama_cpp.tokens_per_s if self.llama_cpp else 0.0
        lines = ["| engine | tokens | decode tok/s | ms/token | vs llama.cpp |", "|---|---|---|---|---|"]
        for r in self.treespec + [r for r in (self.llama_cpp, self.hf) if r is not None]:
            ratio = f"{r.tokens_per_s / base:.2f}x" if base else "-"
            lines.append(f"| {r.name} | {r.tokens} | {r.tokens_per_s:.2f} | {1000 / max(r.tokens_per_s, 1e-9):.1f} "
                         f"| {ratio} |")
        lines.append("\nevery engine decodes each prompt for as many tokens as treespec plain's output has, up to its end "
                     "of text (at most --max-tokens)")
        lines.append(f"llama.cpp: {self.llama_cpp_note}")
        lines += [f"greedy tokens, {name} vs treespec plain: {a}" for name, a in self.exact.items()]
        lines += [f"greedy tokens, {name} vs llama.cpp: {a}" for name, a in self.agreement.items()]
        if self.hf is not None:
            plain = self.treespec[0]
            lines.append(f"{plain.name} / HF = x{plain.tokens_per_s / max(self.hf.tokens_per_s, 1e-9):.2f}")
        return "\n".join(lines)


def compare_ar(llm: LLM, prompts: list[list[int]], max_tokens: int, methods: dict[str, dict | None],
               with_hf: bool = True) -> ArComparison:
    """methods: name -> speculative config, 'plain' (None) first. llama.cpp runs each prompt right after treespec's
    engines on the same GGUF with the same thread count, after one untimed warm-up each; HF runs last (it is slow
    and shares nothing). Each prompt's length is the plain output's, up to its end of text (at most max_tokens):
    every engine then decodes exactly that many tokens, so none is timed on text past the end, where a base model
    repeats itself and n-gram drafting would look better than it is."""
    engines = {name: llm.make_engine(spec) for name, spec in methods.items()}
    n_ctx = max(len(ids) for ids in prompts) + max_tokens + 8
    cpp, note = load_llama_cpp(llm.checkpoint_source, torch.get_num_threads(), n_ctx)
    for engine in engines.values():  # warm-ups, untimed: first-call allocations and kernel loads
        run_treespec(engine, "warm-up", prompts[:1], min(4, max_tokens))
    if cpp is not None:
        run_llama_cpp(cpp, prompts[:1], min(4, max_tokens))
    ours = {name: ArResult(f"treespec {name}") for name in engines}
    theirs = ArResult("llama.cpp") if cpp is not None else None
    budgets = []  # per prompt: the length of plain's output (the first engine), which every other engine decodes
    for ids in prompts:
        budget = max_tokens
        for i, (name, engine) in enumerate(engines.items()):
            run = run_treespec(engine, f"treespec {name}", [ids], budget, stop_at_eos=i == 0)
            budget = len(run.outputs[0])
            ours[name].add(run)
        budgets.append(budget)
        if theirs is not None:
            theirs.add(run_llama_cpp(cpp, [ids], budget))
    out = ArComparison(list(ours.values()), theirs, note)
    plain = out.treespec[0]
    out.exact = {r.name: Agreement.of(r.outputs, plain.outputs) for r in out.treespec[1:]}
    if theirs is not None:
        out.agreement = {r.name: Agreement.of(r.outputs, theirs.outputs) for r in out.treespec}
    if with_hf:
        hf_model, out.hf = build_hf_model(llm), ArResult("hf-transformers")
        for ids, n in zip(prompts, budgets):
            out.hf.add(run_hf(hf_model, [ids], n))
    return out
