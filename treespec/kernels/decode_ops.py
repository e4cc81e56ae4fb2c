"""RMSNorm, few-row attention and a decoder layer's glue as one C++ call each (decode_ops.h), with torch's ops
as twin and fallback.

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
_NO_WEIGHT = torch.empty(0)
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


# ------------------------------------------------------------------------------------- a decoder layer's glue
# Why: after the block products and attention, a decode step's time went to ~40 small torch ops and their Python
# calls per layer (views, RoPE's roll, K/V slice-assigns, transposes, chunk/gelu/mul, norm + add). These four
# calls cover them; models/layers.py runs them where `glue_runs` says so, and keeps torch's ops as their twins.

def glue_runs(x: torch.Tensor) -> bool:
    """Whether the glue kernels take a forward on x: built here, fp32 on the CPU, no autograd (distill trains
    these modules through torch's ops)."""
    return compiled() is not None and x.is_cpu and x.dtype is torch.float32 and not torch.is_grad_enabled()


def qk_norm_rope(qkv: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 heads: int) -> torch.Tensor:  # qkv: [T, W]; weight: [heads, hd]; cos, sin: [T, 1, hd] -> [T, heads, hd]
    """The first `heads` head rows of each qkv row, RMS-normed by weight (None: not normed), then rotated by RoPE."""
    return compiled().qk_norm_rope(qkv, _NO_WEIGHT if weight is None else weight, eps, cos, sin, heads)


def cached_attention(qk: torch.Tensor, qkv: torch.Tensor, rows: tuple[int, int], k_cache: torch.Tensor,
                     v_cache: torch.Tensor, layer: int, slots: tuple[int, int], mask: torch.Tensor | None,
                     scale: float, out: torch.Tensor) -> None:
    """One request's rows (start, n) of a forward: K (qk's heads after the query heads) and V (qkv's last columns)
    into cache slots [slots[0], slots[0] + n) of `layer` (k_cache, v_cache: [layers, KV, C, hd]), then attention of
    its queries over slots [slots[1], slots[0] + n) under mask ([n, L] or None) into out's rows ([T, H hd])."""
    m = _NO_MASK if mask is None else mask
    compiled().cached_attention(qk, qkv, rows[0], rows[1], k_cache, v_cache, layer, slots[0], slots[1], m, scale, out)


def residual_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                  next_weight: torch.Tensor | None = None) -> list[torch.Tensor]:  # x, y: [T, D] -> [h] or [h, z]
    """h = x + rms_norm(y, weight), and z = rms_norm(h, next_weight) when given, rounded as those ops round."""
    w2 = _NO_WEIGHT if next_weight is None else next_weight
    return compiled().residual_norm(x.contiguous(), y.contiguous(), weight, eps, w2)


ACTIVATION_CODES = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}  # models.config.Activation values -> act_mul's


def act_mul(gate_up: torch.Tensor, act: int) -> torch.Tensor:  # gate_up: [T, 2 I] -> [T, I]
    """act(gate) * up in one call: SiLU and GELU's tanh form as x sigmoid(z) in the kernel (within a few ulp of
    torch's), GELU with erf through torch's own."""
    return compiled().act_mul(gate_up, act)
