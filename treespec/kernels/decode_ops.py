"""RMSNorm and few-row attention as one C++ call each (decode_ops.cpp), with torch's ops as twin and fallback.

Why: at one row (decoding) or a few (a token tree) the fixed cost of torch's ops dominates these two:
F.rms_norm runs as ~7 small ops (~90 calls per step on Gemma 3 270M) and scaled_dot_product_attention's CPU
flash kernel allocates and tiles for large problems (~100 us per call for 4 heads x 1 row x 150 keys). Measured
side by side in one process: see docs/BENCHMARKS.md (blocks section). Attention of a 16-row tree (4 heads, 1 K/V
head of 256, 200 keys, 1 thread, CPU time): 490 us per call with one dot product in flight, scalar exp and the value
sums in memory; 290 us with 8 keys' dot products in flight, 8-lane exp and the value sums in registers (1 row: 34 ->
20 us); 18 layers per step.

Both compute each row on its own in a fixed order, so a row's result never depends on the other rows of the
call. Attention goes through the kernel for up to MAX_KERNEL_ROWS query rows (decoding, token trees);
prefill chunks keep torch's kernel, whose GEMMs are faster there.
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from treespec.kernels.block_mm import build, compiled as block_kernel_compiled

_SOURCE = Path(__file__).with_name("decode_ops.cpp")
_NO_MASK = torch.empty(0, dtype=torch.bool)
MAX_KERNEL_ROWS = 64  # query rows per request: trees up to this size score every row like a decode step


@functools.cache
def compiled() -> ModuleType | None:
    """The built kernels, or None where they cannot run here (no AVX2, no compiler)."""
    return build(_SOURCE) if block_kernel_compiled() is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # x: [..., P, D] or [..., D]
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; weight [D], or [P, D] for x's last two dims.
    The checks stay few: at one row this wrapper costs more than the kernel (~1 us)."""
    ext = compiled()
    if ext is None or not x.is_cpu or x.dtype is not torch.float32 or weight.dtype is not torch.float32 or x.shape[-1] % 8 \
            or x.requires_grad or weight.requires_grad or not weight.is_contiguous() or x.numel() == 0:
        return reference_rms_norm(x, weight, eps)
    return ext.rms_norm(x, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's twin: the fused op with a [D] weight, else the unweighted norm times the broadcast weight."""
    if weight.dim() == 1:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return F.rms_norm(x, x.shape[-1:], eps=eps) * weight


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor | None:  # q: [H, n, hd]; k, v: [KV, L, hd]; mask: [n, L] -> [H, n, hd]
    """The kernel's attention, or None when it does not take this call (too many rows, no kernel, odd shapes):
    the caller then uses torch's."""
    ext = compiled()
    if ext is None or not q.is_cpu or q.shape[1] > MAX_KERNEL_ROWS or q.dtype != torch.float32 or q.shape[-1] % 8 \
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1 \
            or q.requires_grad or k.requires_grad or v.requires_grad:
        return None
    m = _NO_MASK if mask is None else mask
    if m.numel() and m.stride(-1) != 1:
        m = m.contiguous()
    return ext.attention(q, k, v, m, scale)
