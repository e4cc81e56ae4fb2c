"""Compute kernels over the GGUF's quantized blocks, each with a pure-torch twin the tests compare it to."""
from __future__ import annotations


def build_all() -> bool:
    """Compile every kernel now (make setup), so no first request pays for it; False where one is unavailable
    (the callers then fall back to their torch twins)."""
    from treespec.kernels import block_mm, q8_head, row_scale
    return all(m.compiled() is not None for m in (block_mm, q8_head, row_scale))
