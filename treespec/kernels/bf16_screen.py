"""A greedy screen straight from the Q8_0 head's blocks with AVX512_BF16: the fp16 screen's job at half its bytes.

Why: a verified 16-node tree needs the argmax of 16 rows over the 262144 x 640 head. The exact Q8_0 kernel
(kernels/q8_head.py) is bound by fp32 multiply-adds from 4 rows, and the fbgemm fp16 screen reads a 335 MB
copy. vdpbf16ps does 32 multiply-adds per instruction; the kernel (bf16_screen.cpp) dequantizes a tile of weight
rows to bf16 once and uses it for every row, reading only the 179 MB of blocks. LMHead.argmax takes it from
lm_head.WIDE_SCREEN_FROM_ROWS rows (below that the Q8_0 kernel or the fp16 copy are as fast or faster).
LMHead (models/lm_head.py) then keeps every token the bound below cannot rule out and rescores those in float64,
exactly as for the fp16 screen, so the answer is still every fp32 product's argmax (or the exact fallback).

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

Measured (benchmarks/q8_head.py --states real --threads 1 --clock thread, CPU time on the shared 2-core Zen 4,
ms at 4 / 8 / 16 rows): this screen 20.6 / 31.4 / 53.8, fbgemm fp16 screen 19.4 / 31.9 / 62.8, Q8_0 kernel
22.2 / 45.5 / 84.8. Without the dequantization (a copy reused; 4 x 4 tiles) it ran ~45 of ~58 ms at 16 rows: vdpbf16ps
throughput binds, so the 189 MB memory time (~10 ms) is out of reach on this CPU.

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
from treespec.kernels.q8_head import Q8Head
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

    def scan(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # h: [T, D] -> [T, V], [T, ceil(V/256)]
        """The screened logits and their per-256-id block maxima (lm_head.block_maxima of them)."""
        return tuple(compiled().bf16_screen(h.bfloat16().contiguous(), self.head.q, self.head.d))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:  # h: [T, D] -> [T, V] fp32
        return self.scan(h)[0]


def reference_screen(h: torch.Tensor, head: Q8Head) -> torch.Tensor:  # h: [T, D] -> [T, V] float64
    """The twin: bf16-rounded activations and weights, multiplied in float64."""
    w = head.d.float().repeat_interleave(32, dim=1) * head.q
    return h.bfloat16().double() @ w.bfloat16().double().t()
