"""Plain decoding: treespec against HF transformers on the same weights, with a bandwidth roofline.

Both run greedy batch-1 generation of the same prompts in one process. The roofline divides the bytes of
weights one decode step must read by the machine's measured read bandwidth.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from treespec.api import LLM
from treespec.sampling import SamplingParams


@dataclass
class ArResult:
    name: str
    tokens: int
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s else 0.0


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


def run_treespec(llm: LLM, prompts: list[list[int]], max_tokens: int) -> ArResult:
    engine = llm.make_engine(None)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens, decode = 0, 0.0
    for ids in prompts:
        req = engine.add_request(ids, params)
        while engine.has_unfinished():
            engine.step()
        tokens += len(req.output_ids) - 1  # the first token comes with the prefill in HF's timing too
        decode += req.metrics.decode_time_s - (req.metrics.decode_time_s / max(1, req.metrics.num_steps))
    return ArResult("treespec", tokens, decode)


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
    tokens, decode = 0, 0.0
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        total = time.perf_counter() - t0
        tokens += out.shape[1] - len(ids) - 1
        decode += max(total - prefill, 1e-9)
    return ArResult("hf-transformers", tokens, decode)
