"""llama.cpp side by side with treespec's plain decoding (optional: llama-cpp-python is not a dependency).

Fair by construction: the same GGUF file, the same prompt token ids (treespec's tokenizer, BOS included; llama.cpp
adds nothing), the same thread count for generation and prompt processing, greedy, every request run to the
token count it is given regardless of EOS (ar_compare gives every engine the length of treespec plain's output).
Timing mirrors ar.run_treespec: the prompt's processing and the first token come out of one call that is not
timed, then `max_tokens - 1` one-token decode steps
(each an eval and llama.cpp's own greedy sampler) are. llama.cpp computes in its own mixed precision, so its
greedy tokens may leave treespec's; the agreement is reported, not required.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from treespec.bench.ar import ArResult


def load_llama_cpp(path: Path, threads: int, n_ctx: int) -> tuple[Any | None, str]:
    """A llama_cpp.Llama over `path`, or None and why not (not installed, not a GGUF file)."""
    if not path.is_file() or path.suffix.lower() != ".gguf":
        return None, f"skipped: {path} is not a GGUF file"
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except ImportError:
        return None, "absent: llama-cpp-python is not installed (pip install llama-cpp-python to compare)"
    model = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                            verbose=False)
    return model, f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, {threads} threads"


def run_llama_cpp(model: Any, prompts: list[list[int]], max_tokens: int) -> ArResult:
    """Greedy decoding of each prompt for max_tokens tokens; decode time excludes the prompt and first token."""
    result = ArResult("llama.cpp")
    for ids in prompts:
        model.reset()
        model.eval(ids)
        out = [model.sample(temp=0.0)]
        t0 = time.perf_counter()
        for _ in range(max_tokens - 1):
            model.eval(out[-1:])
            out.append(model.sample(temp=0.0))
        result.add(ArResult("llama.cpp", len(out) - 1, time.perf_counter() - t0, [out]))
    return result


@dataclass
class Agreement:
    """How far two engines' greedy outputs agree: whole outputs equal, and tokens before the first difference."""
    equal_outputs: int
    outputs: int
    prefix_tokens: int
    tokens: int

    @classmethod
    def of(cls, ours: list[list[int]], theirs: list[list[int]]) -> "Agreement":
        prefix = 0
        for a, b in zip(ours, theirs):
            prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return cls(sum(a == b for a, b in zip(ours, theirs)), len(ours), prefix, sum(len(a) for a in ours))

    def __str__(self) -> str:
        rate = self.prefix_tokens / max(self.tokens, 1)
        return (f"{self.equal_outputs}/{self.outputs} outputs equal; {self.prefix_tokens}/{self.tokens} tokens "
                f"({100 * rate:.0f}%) before the first difference")
