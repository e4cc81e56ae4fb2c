"""GGUF quantized blocks -> one kernel-friendly layout: int8 codes, an fp32 scale per group, an optional fp32 min.

Why one layout: the four block types of the default file (Q8_0, Q5_0, Q4_K, Q6_K) all dequantize to
`scale * q - min` with small integer codes q, so one kernel serves them all, and it streams 1.125-1.25 bytes
per weight instead of the 4 of a dequantized fp32 matrix. The scale and min are computed exactly as the `gguf`
package's dequantizers compute them (fp16 -> fp32, one fp32 product), so `scale * q - min`, rounded once per
operation, reproduces the reference's weights bit for bit (`dequantize_packed` is checked against it).

    type  group  q range     min    bytes/weight here (GGUF's own)
    Q8_0   32    -128..127   no     1.125  (1.0625)
    Q5_0   32    -16..15     no     1.125  (0.6875)
    Q4_K   32    0..15       yes    1.25   (0.5625)
    Q6_K   16    -32..31     no     1.25   (0.8203)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q


@dataclass(frozen=True)
class PackedBlocks:
    """A [out, in] weight as w[n, k] = scale[n, k // group] * q[n, k] - min[n, k // group] (min absent: 0)."""
    q: torch.Tensor                 # [out, in] int8
    scale: torch.Tensor             # [out, in // group] fp32
    min: torch.Tensor | None        # [out, in // group] fp32, or None for symmetric types
    group: int                      # 16 or 32 weights per scale

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.min) if t is not None)


def packable(qtype: Q) -> bool:
    return qtype in _DECODERS


def pack(raw: np.ndarray, qtype: Q, shape: tuple[int, int]) -> PackedBlocks:
    """raw: [nbytes] uint8 of one 2-D GGUF tensor of torch `shape` [out, in] -> PackedBlocks."""
    out_f, in_f = shape
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(raw).reshape(-1, type_size)
    q, scale, mn, group = _DECODERS[qtype](blocks)  # per block: [n, block] codes, [n, block // group] scales
    as_t = lambda a, cols: torch.from_numpy(np.ascontiguousarray(a).reshape(out_f, cols))  # noqa: E731
    return PackedBlocks(as_t(q.astype(np.int8), in_f), as_t(scale, in_f // group),
                        None if mn is None else as_t(mn, in_f // group), group)


def map_rows(p: PackedBlocks, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedBlocks:
    """The same row operation (a permutation, a slice) on codes, scales and mins alike: blocks never span rows."""
    return PackedBlocks(fn(p.q).contiguous(), fn(p.scale).contiguous(),
                        None if p.min is None else fn(p.min).contiguous(), p.group)


def slice_columns(p: PackedBlocks, start: int, stop: int) -> PackedBlocks:
    """Input columns [start, stop) of every row (a row-parallel shard); ValueError unless both are group boundaries
    (a group's codes share one scale and min, so a cut through a group cannot be represented)."""
    width = p.shape[1]
    if start % p.group or stop % p.group or not 0 <= start < stop <= width:
        raise ValueError(f"columns [{start}, {stop}) of a {width}-wide weight do not fall on its "
                         f"{p.group}-weight group boundaries")
    g0, g1 = start // p.group, stop // p.group
    return PackedBlocks(p.q[:, start:stop].contiguous(), p.scale[:, g0:g1].contiguous(),
                        None if p.min is None else p.min[:, g0:g1].contiguous(), p.group)


def concat_rows(parts: list[PackedBlocks]) -> PackedBlocks:
    """Stack weights with the same input width into one (a fused q/k/v or gate/up projection).

    Mixed groups regroup to 16 (a 32-group's scale repeated: the same weights) and a missing min becomes 0,
    both exact, since `scale * q - 0` rounds as `scale * q`.
    """
    group = min(p.group for p in parts)
    regroup = lambda t, g: t.repeat_interleave(g // group, dim=1)  # noqa: E731
    has_min = any(p.min is not None for p in parts)
    mins = [regroup(p.min if p.min is not None else torch.zeros_like(p.scale), p.group) for p in parts]
    return PackedBlocks(torch.cat([p.q for p in parts]), torch.cat([regroup(p.scale, p.group) for p in parts]),
                        torch.cat(mins) if has_min else None, group)


def dequantize_packed(p: PackedBlocks) -> torch.Tensor:  # -> [out, in] fp32
    """The packed weight as fp32, rounded like the kernels: one product, then one subtraction."""
    scale = p.scale.repeat_interleave(p.group, dim=1)
    w = scale * p.q.float()
    return w if p.min is None else w - p.min.repeat_interleave(p.group, dim=1)


def _f16(b: np.ndarray) -> np.ndarray:  # [n, 2] uint8 -> [n, 1] fp32
    return b.copy().view(np.float16).astype(np.float32)


def _q8_0(blocks: np.ndarray):
    """34 bytes: fp16 d, 32 int8 codes; w = d * q."""
    return blocks[:, 2:].view(np.int8), _f16(blocks[:, :2]), None, 32


def _q5_0(blocks: np.ndarray):
    """22 bytes: fp16 d, 32 high bits (u32), 16 bytes of nibbles (codes 0-15 low, 16-31 high); w = d * (q - 16)."""
    high = (blocks[:, 2:6].copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1  # [n, 32]
    nib = blocks[:, 6:22]
    low = np.concatenate([nib & 0x0F, nib >> 4], axis=1)
    q = (low | (high.astype(np.uint8) << 4)).astype(np.int16) - 16
    return q, _f16(blocks[:, :2]), None, 32


def _q4_k(blocks: np.ndarray):
    """144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-scales and sub-mins, 128 bytes of nibbles.

    8 sub-blocks of 32: w = (d * sc_j) * q - (dmin * m_j). Sub-block 2i is the low nibbles of bytes
    32i..32i+31, sub-block 2i+1 their high nibbles. sc/m 0-3: the low 6 bits of bytes 0-3 / 4-7;
    sc/m 4-7: the nibbles of bytes 8-11 (low for sc, high for m) with bytes 0-3 / 4-7's top 2 bits above.
    """
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    s = blocks[:, 4:16]
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1).astype(np.float32)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1).astype(np.float32)
    nib = blocks[:, 16:].reshape(-1, 4, 1, 32)
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=2).reshape(-1, 256)
    return q, d * sc, dmin * m, 32


def _q6_k(blocks: np.ndarray):
    """210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 sub-scales, fp16 d.

    16 sub-blocks of 16: w = (d * sc_j) * (q - 32). Each half (128 weights) takes 64 low-nibble bytes
    (low nibbles: weights 0-63, high: 64-127) and 32 high bytes (bit pairs 0,2,4,6 -> weights 0-31, ..., 96-127).
    """
    ql = blocks[:, :128].reshape(-1, 2, 1, 64)
    ql = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (ql | ((qh & 0x03) << 4)).reshape(-1, 256).astype(np.int16) - 32
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return q, _f16(blocks[:, 208:210]) * sc, None, 16


_DECODERS = {Q.Q8_0: _q8_0, Q.Q5_0: _q5_0, Q.Q4_K: _q4_k, Q.Q6_K: _q6_k}
