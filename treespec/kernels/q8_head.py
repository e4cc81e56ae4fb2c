"""The tied Q8_0 head/embedding straight from its blocks: exact fp32 logits and a fused greedy argmax.

Why: the head is most of a decode step's bytes (Gemma 3 270M: 262144 x 640). Its blocks as int8 codes plus the
file's fp16 scale per 32 are 179 MB; the fp32 head is 671 MB and models/lm_head.py's fp16 screen 335 MB. The
kernel (q8_head.cpp) sums each group's codes times the activations in fp32 and adds that sum times the group's
scale: an fp32 dot product of the dequantized weights (fp16 * int8 is exact) in one fixed order, so these are the
dequantized head's fp32 logits up to summation order. `argmax` keeps each row's best few logits inside the
kernel instead of writing 262144 per row.

Two notions of "the" argmax (lowest id on ties in both):
- `argmax(h).ids` is exactly `logits(h).argmax(-1)`: this kernel's own fp32 logits, bit for bit.
- Another fp32 product of the same weights (torch's mm, LMHead's exact path) sums in another order, so on a
  near-tie (two logits within ~1e-5) it may pick the other token. `certain` marks the rows where `ids` is proved
  to be every fp32 product's argmax (the bound below, then float64 rescoring of the few tokens within it);
  a caller that must agree with one particular product recomputes the other rows with it.

Measured on the default GGUF's head, 2 threads, quiet machine, ms (median of interleaved rounds): rows 1 / 2 / 3 /
4 / 6: 4.5 / 6.3 / 8.4 / 10.6 / 16.7 (the scale applied per weight before: 5.4 / 7.1 / 9.4 / 11.0 / 17.8). One
row streams the 179 MB at ~39 GB/s; from 2 rows the fp32 multiply-adds bind, so LMHead takes the bf16 screen
(kernels/bf16_screen.py) from 4 rows. The fused top-k measured the same as writing the logits and taking argmax
(1 thread: 10.5 vs 10.2 ms at 1 row, 92 vs 90 at 16); it keeps 64 rows from writing 67 MB of logits.

Bound: for any order of an fp32 D-term dot product, |fl(w.h) - w.h| <= gamma_D sum|w_j h_j| <= gamma_D |w| |h|
(Higham), so two fp32 products of the same weights differ by at most E = 2 gamma_D max_v |w_v| |h|, and every
token that could be another product's argmax has a logit here >= top - 2E (softcap: lm_head.candidate_threshold).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from treespec.kernels.block_layout import PackedBlocks, dequantize_packed
from treespec.kernels.block_mm import build, compiled as block_kernel_compiled
from treespec.models.lm_head import candidate_threshold, capped, certified_winner, gamma

_SOURCE = Path(__file__).with_name("q8_head.cpp")
TOP_K = 8                 # logits kept per row by the fused argmax: enough unless more than 8 are near-tied
_NORM_CHUNK = 16384       # rows per chunk when measuring row norms (bounds temporary memory)


@functools.cache
def compiled() -> ModuleType | None:
    """The built head kernel, or None where the block kernels cannot run here (no AVX2, no compiler)."""
    return build(_SOURCE) if block_kernel_compiled() is not None else None


@dataclass(frozen=True)
class HeadChoice:
    """Greedy choice per row: ids [T] int64, top [T] fp32 (its value, softcapped), certain [T] bool; rescored:
    certain rows decided by float64 rescoring of more than one candidate, candidates: those candidates."""
    ids: torch.Tensor
    top: torch.Tensor
    certain: torch.Tensor
    rescored: int = 0
    candidates: int = 0


class Q8Head:
    """A [V, D] Q8_0 weight (PackedBlocks, group 32, no min) as int8 codes + fp16 scales."""

    def __init__(self, blocks: PackedBlocks, softcap: float | None = None) -> None:
        if blocks.group != 32 or blocks.min is not None or blocks.bits != 8:
            raise ValueError("Q8Head wants Q8_0 blocks: int8 codes, group 32, no min")
        d = blocks.scale.half()
        if not torch.equal(d.float(), blocks.scale) or not bool(torch.isfinite(blocks.scale).all()):
            raise ValueError("Q8Head wants finite fp16 scales (Q8_0 stores them as fp16)")
        self.q = blocks.q                     # [V, D] int8
        self.d = d.contiguous()               # [V, D / 32] fp16
        self.softcap = softcap
        self.slope = 2.0 * gamma(self.q.shape[1]) * self._max_row_norm() * (1.0 + 1e-9)

    @property
    def blocks(self) -> PackedBlocks:
        return PackedBlocks(self.q, self.d.float(), None, 32)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.d.numel()

    def _max_row_norm(self) -> float:
        worst = 0.0
        for start in range(0, self.q.shape[0], _NORM_CHUNK):
            w = self.rows_f64(torch.arange(start, min(start + _NORM_CHUNK, self.q.shape[0])))
            worst = max(worst, w.norm(dim=1).max().item())
        return worst

    def rows_f64(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [C] -> [C, D] float64, exact
        return (self.d[ids].double().repeat_interleave(32, dim=1) * self.q[ids].double())

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T, V] fp32, softcapped if configured
        ext = compiled()
        raw = ext.q8_logits(h.float().contiguous(), self.q, self.d) if ext else reference_logits(h, self.blocks)
        return capped(raw, self.softcap)

    def topk(self, h: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:  # h: [T, D]
        """Each row's k largest raw (uncapped) logits and their ids, best first, lowest id first among equals:
        ([T, k] fp32, [T, k] int64), the same entries as a stable descending sort of the kernel's logits."""
        ext = compiled()
        if ext is None:
            order = reference_logits(h, self.blocks).sort(dim=1, descending=True, stable=True)
            return order.values[:, :k], order.indices[:, :k]
        return tuple(ext.q8_topk(h.float().contiguous(), self.q, self.d, k))

    def argmax(self, h: torch.Tensor) -> HeadChoice:  # h: [T, D]
        """ids = logits(h).argmax(-1) exactly (lowest id on ties), certain where every fp32 product agrees
        (module docstring)."""
        vals, ids = self.topk(h, min(TOP_K, self.q.shape[0]))        # all tokens when the vocabulary is tiny
        return certify(self, h, vals, ids, self.slope * h.double().norm(dim=1), own=True)


def certify(head: Q8Head, h: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, err: torch.Tensor,
            own: bool) -> HeadChoice:  # h: [T, D]; vals, ids: [T, k] best first; err: [T] float64
    """Each row's greedy choice from a kernel's top-k (vals: raw values, ids) whose values are within err of every
    fp32 product of the head's weights: certain where only one kept token can reach the top, or float64 rescoring
    of those that can decides. own: the values are the head's own fp32 logits (Q8Head.argmax), so ids must stay
    their argmax (the full logits decide where the top-k cannot); else (a screen) an uncertain row's id is only
    the screen's pick. The decisions run on Python floats: a step asks for a few rows, where ~20 small tensor ops
    per call cost more than the arithmetic."""
    hd = h.double()
    softcap, vocab = head.softcap, head.q.shape[0]
    thr = candidate_threshold(vals[:, 0].double(), err, softcap).tolist()
    raw = vals.tolist()
    rows = zip(raw, capped(vals, softcap).tolist() if softcap is not None else raw, ids.tolist(), thr)
    picked, top, certain, rescored, candidates = [], [], [], 0, 0
    for t, (v, cv, i, th) in enumerate(rows):
        best = cv[0]
        # NaN values, fewer than k of them, or a capped tie that may go beyond the k kept: the top-k cannot decide
        if best != best or i[-1] < 0 or (cv[-1] == best and len(v) < vocab):
            if own:
                row = head.logits(h[t:t + 1])[0]
                best, i = float(row.max()), [int(row.argmax())]
            picked.append(i[0])
            top.append(best)
            certain.append(False)
            continue
        choice = min(n for c, n in zip(cv, i) if c == best)        # the softcap can merge close values
        near = [j for j, x in enumerate(v) if x >= th]              # every token another product could pick
        sure = math.isfinite(th) and (near[-1] < len(v) - 1 or len(v) == vocab)
        if sure and len(near) > 1:
            cand = ids[t, near]
            winner = certified_winner(head.rows_f64(cand), hd[t], cand, softcap)
            sure = winner is not None and (winner == choice or not own)
            choice = choice if own or winner is None else winner
            rescored += sure
            candidates += len(near) if sure else 0
        picked.append(choice)
        top.append(best)
        certain.append(sure)
    return HeadChoice(torch.tensor(picked, dtype=torch.int64), torch.tensor(top, dtype=torch.float32),
                      torch.tensor(certain, dtype=torch.bool), rescored, candidates)


def reference_logits(h: torch.Tensor, blocks: PackedBlocks) -> torch.Tensor:  # h: [T, D] -> [T, V] fp32 raw
    """The obviously-correct twin: dequantize, then torch's fp32 product."""
    return h.float() @ dequantize_packed(blocks).t()
