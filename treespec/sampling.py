"""Sampling parameters (vLLM-shaped) and the logits -> probabilities pipeline.

Speculative sampling is exact about *processed* distributions, so the target's p and every drafter's q must
go through the same `apply_penalties` + `logits_to_probs`. Order: penalties (repetition over prompt + output,
then frequency and presence over output), temperature, top-k, top-p, min-p (HF's warper order).
Stop strings, max_tokens and EOS are the engine's business.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from treespec.errors import ConfigError

_GREEDY_EPS = 1e-5        # temperatures below this mean greedy (as in vLLM)
_TOP_P_FIRST_K = 1024     # top-p looks at this many best tokens first and doubles until the nucleus fits


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # HF: logit / penalty if positive else logit * penalty, over prompt + output
    presence_penalty: float = 0.0     # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0    # OpenAI: subtracted per occurrence in the output
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int(self.n, "n", 1)
        _check_float(self.temperature, "temperature", 0.0, math.inf, "a finite number >= 0")
        _check_float(self.top_p, "top_p", 0.0, 1.0, "in (0, 1]")
        if self.top_p <= 0.0:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        _check_int(self.top_k, "top_k", -1)
        _check_float(self.min_p, "min_p", 0.0, 1.0, "in [0, 1]")
        _check_float(self.repetition_penalty, "repetition_penalty", 0.0, math.inf, "a finite number > 0")
        if self.repetition_penalty <= 0.0:
            raise ConfigError(f"repetition_penalty: must be > 0, got {self.repetition_penalty!r}")
        _check_float(self.presence_penalty, "presence_penalty", -2.0, 2.0, "in [-2, 2]")
        _check_float(self.frequency_penalty, "frequency_penalty", -2.0, 2.0, "in [-2, 2]")
        if self.seed is not None:
            _check_int(self.seed, "seed", 0)
        _check_int(self.max_tokens, "max_tokens", 1)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop: must be a non-empty string or a list of them, got {self.stop!r}")
        if self.stop_token_ids is not None:
            if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
                raise ConfigError(f"stop_token_ids: must be a list of token ids, got {self.stop_token_ids!r}")
            self.stop_token_ids = list(self.stop_token_ids)
            for t in self.stop_token_ids:
                _check_int(t, "stop_token_ids", 0)
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos: must be true or false, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """Whether repetition / presence / frequency penalties change the logits (they depend on history)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def temperature_only(self) -> bool:
        """Sampling from softmax(logits / T) itself: no penalties, no top-k / top-p / min-p truncation."""
        return (not self.greedy and not self.has_penalties and self.top_k <= 0 and self.top_p >= 1.0
                and self.min_p <= 0.0)


def _check_int(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")


def _check_float(value, name: str, low: float, high: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not low <= value <= high or (math.isinf(value) and math.isinf(high)):
        raise ConfigError(f"{name}: must be {what}, got {value!r}")


# ---- logits processing ------------------------------------------------------------------------------------
def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[list[int]]) -> torch.Tensor:
    """logits: [n, V]; row i is penalised by output_ids[i] (committed output + that node's draft ancestors)."""
    rp, fp, pp = params.repetition_penalty, params.frequency_penalty, params.presence_penalty
    if rp == 1.0 and fp == 0.0 and pp == 0.0:
        return logits
    n, vocab = logits.shape
    logits = logits.clone()
    rows = torch.repeat_interleave(torch.arange(n), torch.tensor([len(o) for o in output_ids], dtype=torch.long))
    cols = torch.tensor([t for o in output_ids for t in o], dtype=torch.long)
    if rp != 1.0:
        prompt = torch.tensor(prompt_ids, dtype=torch.long)
        seen = torch.cat([rows * vocab + cols, (torch.arange(n)[:, None] * vocab + prompt).flatten()]).unique()
        r, c = seen // vocab, seen % vocab
        vals = logits[r, c]
        logits[r, c] = torch.where(vals < 0, vals * rp, vals / rp)
    if fp != 0.0 or pp != 0.0:
        keys, counts = (rows * vocab + cols).unique(return_counts=True)
        r, c = keys // vocab, keys % vocab
        logits[r, c] -= fp * counts.to(logits.dtype) + pp
    return logits


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [n, V] -> fp32 probabilities [n, V]. Greedy gives the one-hot argmax."""
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        logits = top_k_mask(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_mask(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = min_p_filter(probs, params.min_p)
    return probs


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest of their row (ties at the boundary are kept, as in HF); others -inf."""
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of best tokens whose probability reaches top_p: a token stays iff the mass of the
    tokens ranked above it is < top_p. Looks at a growing top-k instead of sorting the whole vocabulary."""
    probs = torch.softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    k = min(_TOP_P_FIRST_K, vocab)
    while True:
        best = torch.topk(probs, k, dim=-1)  # sorted, descending
        before = best.values.cumsum(-1) - best.values  # mass ranked above each of the k best
        if k == vocab or bool((before[..., -1] >= top_p).all()):  # the cut falls inside the k best
            break
        k = min(2 * k, vocab)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, best.indices, before < top_p)
    return logits.masked_fill(~keep, -math.inf)


def min_p_filter(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens below min_p times their row's top probability, renormalize."""
    kept = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


# ---- sampling ---------------------------------------------------------------------------------------------
def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs: [n, V] -> [n] long, one draw per row."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded (reproducible) or from OS entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
