"""A decode forward's decoder layers as one C++ call (decode_stack.cpp): the block products and the glue of every
layer, called from C++ in the order models/layers.py calls them from Python.

Why: with the products, the head and the glue in C++, what was left of a decode step outside them was Python
around ~10 C++ calls per layer (module calls, attribute lookups, argument conversion). Measured on the default GGUF
with the products and the head stubbed out (engine, glue kernels and Python only, 2 threads): 1.47 ms per
token, ~0.75 ms of it the layers' Python.

models/decode_stack.py describes a model's blocks to it and takes the forwards the layers' glue path with cached
attention would take (ForwardBatch.cached: fp32 on the CPU, no autograd, every request few rows); that path
stays as its twin (tests/test_decode_stack.py: hidden states and caches equal bit for bit).
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from treespec.kernels import decode_ops
from treespec.kernels.block_mm import build, host_isa

_SOURCE = Path(__file__).with_name("decode_stack.cpp")


@functools.cache
def compiled() -> ModuleType | None:
    """The built stack for this CPU (the block products' widest build), or None where it cannot run here."""
    isa = host_isa()
    return build(_SOURCE, isa) if isa is not None and decode_ops.compiled() is not None else None
