"""GGML block formats -> float32, vectorised with numpy.

The block maths is the `gguf` package's own (`gguf.quants.<TYPE>.dequantize_rows`); we only feed it large row
chunks. `gguf.quants.dequantize` splits every tensor into groups of 16 rows, which costs 4.3 s on Gemma's
262144-row Q8_0 embedding against 0.2 s here. Q8_1 and Q8_K have no `gguf` implementation and are decoded
below. `gguf.quants.dequantize` stays the reference the tests compare against.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from treespec.errors import ModelLoadError

_CHUNK_VALUES = 1 << 19  # ~2 MB of float32 per chunk keeps the intermediates in cache

_PLAIN: dict[GGMLQuantizationType, np.dtype] = {
    GGMLQuantizationType.F32: np.dtype("<f4"), GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"), GGMLQuantizationType.I8: np.dtype("i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"), GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


def _q8_1(blocks: np.ndarray) -> np.ndarray:
    """Q8_1 as gguf's size table lays it out (40 bytes): f32 scale d, f32 sum s (dot products only), 32 int8 q.

    Q8_1 and Q8_K are llama.cpp's activation formats and practically never stored; value = d * q.
    """
    d = blocks[:, :4].copy().view("<f4")
    return d * blocks[:, 8:].view(np.int8).astype(np.float32)


def _q8_k(blocks: np.ndarray) -> np.ndarray:
    """Q8_K: f32 scale d, 256 int8 q, 16 int16 block sums (only used by dot products); value = d * q."""
    d = blocks[:, :4].copy().view("<f4")
    return d * blocks[:, 4:260].view(np.int8).astype(np.float32)


_OWN = {GGMLQuantizationType.Q8_1: _q8_1, GGMLQuantizationType.Q8_K: _q8_k}


def supported(qtype: GGMLQuantizationType) -> bool:
    return qtype in _PLAIN or qtype in _OWN or isinstance(getattr(quants, qtype.name, None), type)


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """raw: [nbytes] uint8 of one tensor -> float32 array of `shape` (torch order); never a view of `raw`."""
    if qtype in _PLAIN:
        return raw.view(_PLAIN[qtype]).astype(np.float32).reshape(shape)  # astype copies
    if not supported(qtype):
        raise ModelLoadError(f"GGML type {qtype.name} cannot be dequantized by treespec")
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = raw.size // type_size
    blocks = raw.reshape(n_blocks, type_size)
    out = np.empty((n_blocks, block), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // block)
    decode = _OWN.get(qtype) or _gguf_blocks(qtype)
    for i in range(0, n_blocks, step):
        out[i: i + step] = decode(blocks[i: i + step])
    return out.reshape(shape)


def _gguf_blocks(qtype: GGMLQuantizationType):
    cls = getattr(quants, qtype.name)
    cls.init_grid()  # the IQ types decode through a lookup grid built on first use
    return cls.dequantize_rows  # [n, type_size] uint8 -> [n, block] float32
