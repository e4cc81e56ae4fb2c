"""x @ W^T straight from quantized blocks (block_layout.PackedBlocks): the compiled kernel and its torch twin.

Why C++ and not numba: measured on this 2-core AVX2/AVX-512 CPU, one 2048x640 Q5_0-shaped weight, 1 thread,
best of 30 (us):

    rows                         1      4     16
    block_mm.cpp (AVX2)         74    137    539
    numba, 32-lane accumulator 110   2200   7300    (the same layout; its few-row loop re-reads x per row)
    torch fp32 mm (dequantized) 100    297    556

The kernel is built on first use with torch.utils.cpp_extension (needs a C++ compiler and ninja) and cached
by torch; where it cannot be built or run (no compiler, no AVX2) `compiled()` is None and callers keep the
dequantized fp32 weight instead (see models/quant_blocks.py). `reference_mm` is the twin the tests compare to.
"""
from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

from treespec.kernels.block_layout import PackedBlocks, dequantize_packed

_SOURCE = Path(__file__).with_name("block_mm.cpp")
# -ffp-contract=off keeps `scale * q - min` two roundings, as the reference rounds it
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]
_NO_MIN = torch.empty(0)


@functools.cache
def compiled() -> ModuleType | None:
    """The built extension, or None (after one warning) where it cannot be built or would not run here."""
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils import cpp_extension
        return cpp_extension.load(name="treespec_block_mm", sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler or ninja, or a failed build
        warnings.warn(f"treespec: block kernel unavailable ({str(e).splitlines()[0] if str(e) else e!r}); "
                      f"quantized weights fall back to dequantized fp32", RuntimeWarning, stacklevel=2)
        return None


def block_mm(x: torch.Tensor, w: PackedBlocks) -> torch.Tensor:  # x: [T, in] fp32 -> [T, out] fp32
    """x @ W^T with W = w dequantized; each row's result is independent of the other rows (bitwise)."""
    ext = compiled()
    if ext is None:
        return reference_mm(x, w)
    return ext.block_mm(x.contiguous(), w.q, w.scale, _NO_MIN if w.min is None else w.min, w.group)


def reference_mm(x: torch.Tensor, w: PackedBlocks) -> torch.Tensor:  # x: [T, in] -> [T, out]
    """The obviously-correct twin: dequantize, then torch's fp32 product."""
    return x @ dequantize_packed(w).t()
