"""A greedy screen straight from the Q8_0 head's blocks with AVX512_BF16: the fp16 screen's job at half its bytes.

Why: a verified tree needs the argmax of several rows over the 262144 x 640 head. The exact Q8_0 kernel
(kernels/q8_head.py) is bound by fp32 multiply-adds from 4 rows, and the fbgemm fp16 screen reads a 335 MB
copy. vdpbf16ps does 32 multiply-adds per instruction; the kernel (bf16_screen.cpp) rounds a tile of weight
rows to bf16 once and uses it for every row, reading only the 179 MB of blocks, and keeps each row's TOP_K best
values as it goes (as the Q8_0 head does) instead of writing 262144 per row. LMHead.argmax takes it from
lm_head.WIDE_SCREEN_FROM_ROWS rows. `argmax` keeps every token the bound below cannot rule out and rescores those
in float64 (q8_head.certify), so a certain row's answer is every fp32 product's argmax; a row it cannot settle
(more than TOP_K candidates, a near-tie, non-finite values) is marked uncertain and LMHead decides it the fp16
screen's way (or from the exact logits).

Bound, per row h and token v (u = 2^-24, gamma_n = n u / (1 - n u), w_v the dequantized row, w~_v = bf16(w_v),
h~ = bf16(h), both round to nearest even; r_v any fp32 product of w_v and h):
  kernel:    |s_v - w~_v.h~| <= gamma_2D |w~_v| |h~| + A    (bf16 products are exact in fp32; the fp32 sums
                                                            take any order, and gamma_2D leaves room for the
                                                            pair inside one vdpbf16ps being rounded twice)
  h rounded: |w~_v.h~ - w~_v.h| <= |w~_v| |h~ - h|          (Cauchy-Schwarz)
  w rounded: |w~_v.h - w_v.h| <= |w~_v - w_v| |h|
  reference: |r_v - w_v.h| <= gamma_D |w_v| |h|
so |s_v - r_v| <= E(h) = W~ (gamma_2D |h~| + |h - h~|) + dW |h| + gamma_D W |h| + A, with W~ = max_v |w~_v|,
dW = max_v |w_v - w~_v|, W = max_v |w_v| measured once at load (float64), the norms of h per call.
A covers vdpbf16ps's denormal handling (inputs as zero, results flushed to zero: each flush moves a value
below 2^-126): A = 2 * 2^-126 (sqrt(D) W~ + 2 D). Candidates are then the tokens with s_v >= max s - 2E.
Why rounded weights: keeping them exact (bf16(q) is exact for int8, d applied per group of 32 by an fp32 FMA)
would drop the dW term but double the instructions per group and row, and the kernel is bound by those from 8
rows (not measured as a kernel; a microbenchmark here ran vdpbf16ps and vfmadd zmm at the same rate). On real
hidden states the rounded weights' bound leaves 1 row in 16 with a second candidate (benchmarks/q8_head.py).

Measured (benchmarks/q8_head.py --states real --threads 2, wall clock, quiet machine, ms at 1 / 2 / 4 / 8 / 16 rows):
LMHead through this screen 8.9 / 11.1 / 11.2 / 15.5 / 25.5, through the fbgemm fp16 screen 10.9 / 10.1 / 10.6 /
16.4 / 32.4, the Q8_0 kernel 7.8 / 8.9 / 11.5 / 22.3 / 46.6. The kernel alone: one row ~6.3 (the bf16 rounding,
~8 vector ops per 32 weights, binds: the Q8_0 kernel's 5.4 is the memory time), then ~1.2 per further row
(vdpbf16ps throughput). In the engine (auto on the bench's prompts, 4-node trees, three interleaved runs) the head
of a 4-row step took 11.2-11.5 ms through this screen against 12.4-12.6 through the fp16 copy.

Where the CPU lacks AVX512_BF16 (e.g. AVX2-only CI machines) `compiled()` is None and LMHead keeps the fp16
screen, with identical answers.
"""
from __future__ import annotations

import functools
import math
import platform
from pathlib import Path
from types import ModuleType

import torch

from treespec.kernels.block_mm import build, compiled as block_kernel_compiled
from treespec.kernels.q8_head import TOP_K, HeadChoice, Q8Head, certify
from treespec.models.lm_head import gamma

_SOURCE = Path(__file__).with_name("bf16_screen.cpp")
_FLAGS = ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512bf16")
_FLUSH = 2.0 ** -126      # smallest normal fp32 / bf16: what vdpbf16ps flushes below


def cpu_has_avx512_bf16() -> bool:
    """From the kernel's CPU flags (Linux; torch exposes no check for this extension). Elsewhere: False."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags and "avx512bw" in flags and "avx512vl" in flags


@functools.cache
def compiled() -> ModuleType | None:
    """The built screen kernel, or None where it cannot run here (no AVX512_BF16, no compiler)."""
    if not cpu_has_avx512_bf16() or block_kernel_compiled() is None:
        return None
    return build(_SOURCE, flags=_FLAGS)


class Bf16Screen:
    """Screened logits of a Q8Head's blocks and their error bound (module docstring)."""

    def __init__(self, head: Q8Head) -> None:
        self.head = head
        dim = head.q.shape[1]
        rounded, error, exact = self._max_norms()
        self.rounded_norm, self.error_norm, self.exact_norm = rounded, error, exact
        self._g2, self._g = gamma(2 * dim), gamma(dim)
        self._flush = 2.0 * _FLUSH * (math.sqrt(dim) * rounded + 2.0 * dim)

    @classmethod
    def build(cls, head: Q8Head) -> "Bf16Screen | None":
        """None where the kernel is unavailable here."""
        return cls(head) if compiled() is not None else None

    def _max_norms(self) -> tuple[float, float, float]:
        """max_v |bf16(w_v)|, max_v |w_v - bf16(w_v)|, max_v |w_v| (w_v exact in fp32: fp16 * int8), the
        bf16 rounding the kernel's own; the float64 sums' relative error (< 1e-12) is covered by the margin."""
        squares = compiled().bf16_sums_of_squares(self.head.q, self.head.d).amax(dim=0)
        return tuple(math.sqrt(x) * (1.0 + 1e-9) for x in squares.tolist())

    def error(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] fp32 -> [T] float64
        """E(h) per row: every |s_v - r_v| is at most this (inf / NaN for non-finite h: the caller falls back)."""
        hd = h.double()
        hb = h.bfloat16().double()
        e = self.rounded_norm * (self._g2 * hb.norm(dim=1) + (hd - hb).norm(dim=1)) + \
            (self.error_norm + self._g * self.exact_norm) * hd.norm(dim=1) + self._flush
        return e * (1.0 + 1e-9)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T, V] fp32
        """Every screened value (tests and benchmarks; argmax() never writes them)."""
        return compiled().bf16_logits(h.bfloat16().contiguous(), self.head.q, self.head.d)

    def argmax(self, h: torch.Tensor) -> HeadChoice:  # h: [T, D]
        """Each row's certified greedy choice (every fp32 product's argmax) where the kept top values settle it;
        the other rows are marked uncertain (their ids are only the screen's pick)."""
        vals, ids = compiled().bf16_topk(h.bfloat16().contiguous(), self.head.q, self.head.d,
                                         min(TOP_K, self.head.q.shape[0]))
        return certify(self.head, h, vals, ids, self.error(h), own=False)


def reference_screen(h: torch.Tensor, head: Q8Head) -> torch.Tensor:  # h: [T, D] -> [T, V] float64
    """The twin: bf16-rounded activations and weights, multiplied in float64."""
    w = head.d.float().repeat_interleave(32, dim=1) * head.q
    return h.bfloat16().double() @ w.bfloat16().double().t()
