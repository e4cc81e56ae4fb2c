"""Each row of activations over its own max |x|: the per-row scale that keeps int8 mode lossless under speculation.

models/quant.py quantizes activations per row so a tree's rows never change each other's numbers. Torch's amax and
division cost ~140 us per call at 64 rows here (each op a parallel region), which over Gemma 3 270M's 72
projections added ~16 ms per 64-row step; the compiled pass takes ~24 us. Same bits either way.

NaN rows: the compiled max skips NaN where torch's propagates it; such a row is garbage in both.
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from treespec.kernels.block_mm import build, compiled as block_kernel_compiled

_SOURCE = Path(__file__).with_name("row_scale.cpp")


@functools.cache
def compiled() -> ModuleType | None:
    """The built pass, or None where the block kernels cannot run here (then the twin runs)."""
    return build(_SOURCE) if block_kernel_compiled() is not None else None


def normalize_rows(x: torch.Tensor, tiny: float) -> tuple[torch.Tensor, torch.Tensor]:  # x: [T, K] fp32
    """(x / amax [T, K], amax [T, 1]) with amax = max(max |x_row|, tiny)."""
    ext = compiled()
    return tuple(ext.normalize_rows(x, tiny)) if ext is not None else reference_normalize_rows(x, tiny)


def reference_normalize_rows(x: torch.Tensor, tiny: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin, in torch ops."""
    amax = x.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
    return x / amax, amax
