"""Plain decoding: treespec against HF transformers (and llama.cpp: bench/llamacpp.py), with a bandwidth roofline.

All run greedy batch-1 generation of the same prompt ids in one process, prompt by prompt in turn so that a
busy spell of a shared machine hits every engine alike. The roofline divides the bytes of weights one decode
step must read by the machine's measured read bandwidth.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from treespec.api import LLM
from treespec.engine.engine import LLMEngine
from treespec.sampling import SamplingParams


@dataclass
class ArResult:
    """Decode tokens (after the first) and their time, summed over prompts; each prompt's output ids."""
    name: str
    tokens: int = 0
    decode_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s else 0.0

    def add(self, other: "ArResult") -> None:
        self.tokens += other.tokens
        self.decode_s += other.decode_s
        self.outputs += other.outputs


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: best of `repeats` sums over a buffer far larger than the caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def bytes_per_step(model: torch.nn.Module) -> int:
    """Weight bytes a batch-1 decode step reads: every layer weight once, the head as its fast path stores it."""
    total = sum(getattr(m, "weight_nbytes", 0) for m in model.modules())  # packed quantized linears
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or "embed" in name or "rope" in name or "cos" in name or "sin" in name:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total + model.lm_head.bytes_per_step()


def run_treespec(engine: LLMEngine, name: str, prompts: list[list[int]], max_tokens: int,
                 stop_at_eos: bool = False) -> ArResult:
    """Greedy generation of max_tokens per prompt (through end of text too, unless stop_at_eos)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=not stop_at_eos)
    result = ArResult(name)
    for ids in prompts:
        req = engine.add_request(ids, params)
        while engine.has_unfinished():
            engine.step()
        m = req.metrics  # the first token comes with the prefill in HF's and llama.cpp's timing too
        result.add(ArResult(name, len(req.output_ids) - 1, m.decode_time_s - m.decode_time_s / max(1, m.num_steps),
                            [list(req.output_ids)]))
    return result


def build_hf_model(llm: LLM) -> torch.nn.Module:
    """transformers' own model class over the same (dequantized) weights, on treespec's device and dtype: the
    reference implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(llm.model_config)
    hf_cfg = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    from treespec.weights.loader import load_checkpoint
    state = load_checkpoint(str(llm.checkpoint_source)).tensors
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing:
        raise RuntimeError(f"HF model is missing weights: {missing[:5]}")
    if getattr(hf_cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(llm.placement.device, llm.placement.dtype).eval()


@torch.inference_mode()
def run_hf(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> ArResult:
    result = ArResult("hf-transformers")
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        total = time.perf_counter() - t0
        result.add(ArResult("hf-transformers", out.shape[1] - len(ids) - 1, max(total - prefill, 1e-9),
                            [out[0, len(ids):].tolist()]))
    return result
