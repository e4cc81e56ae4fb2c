"""Compute kernels over the GGUF's quantized blocks, each with a pure-torch twin the tests compare it to."""
from __future__ import annotations


def build_all() -> bool:
    """Compile every kernel now (make setup), so no first request pays for it; False where one is unavailable
    (the callers then fall back to their torch twins)."""
    from treespec.kernels import bf16_screen, block_mm, q8_head, row_scale
    bf16_screen.compiled()  # optional: None where the CPU lacks AVX512_BF16, and LMHead then does without it
    return all(m.compiled() is not None for m in (block_mm, q8_head, row_scale))
