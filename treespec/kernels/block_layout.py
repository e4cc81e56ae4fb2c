"""GGUF quantized blocks -> one kernel-friendly layout: small integer codes, an fp32 scale per group, an
optional fp32 min.

Why one layout: the four block types of the default file (Q8_0, Q5_0, Q4_K, Q6_K) all dequantize to
`scale * q - min` with small integer codes q, so one kernel serves them all, and it streams 0.75-1.25 bytes
per weight instead of the 4 of a dequantized fp32 matrix. The scale and min are computed exactly as the `gguf`
package's dequantizers compute them (fp16 -> fp32, one fp32 product), so `scale * q - min`, rounded once per
operation, reproduces the reference's weights bit for bit (`dequantize_packed` is checked against it).

    type  group  q range     codes stored as   min    bytes/weight here (GGUF's own)
    Q8_0   32    -128..127   int8              no     1.125  (1.0625)
    Q5_0   32    -16..15     int8              no     1.125  (0.6875)
    Q4_K   32    0..15       nibbles           yes    0.75   (0.5625)
    Q6_K   16    -32..31     int8              no     1.25   (0.8203)

Nibbles (`bits` 4) come in units of 32 columns, never spanning one: q [out, in // 2] uint8, byte j of a unit =
code j | code j + 16 << 4. So columns [a, b) on group (= unit) boundaries are q[:, a // 2: b // 2] (int8 codes:
q[:, a: b]), and scales and mins [:, a // group: b // group] (slice_columns). Q5_0 stays int8: as nibbles plus
a plane of 5th bits (0.75 bytes/weight) its unpacking made a one-row body product slower, not faster
(kernels/block_mm.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q


UNIT = 32  # columns per unit of nibbles


@dataclass(frozen=True)
class PackedBlocks:
    """A [out, in] weight as w[n, k] = scale[n, k // group] * q[n, k] - min[n, k // group] (min absent: 0),
    with q the codes (module docstring: one int8 each, or nibbles)."""
    q: torch.Tensor                 # [out, in] int8, or [out, in // 2] uint8 nibbles
    scale: torch.Tensor             # [out, in // group] fp32
    min: torch.Tensor | None        # [out, in // group] fp32, or None for symmetric types
    group: int                      # 16 or 32 weights per scale (32 with nibbles)

    @property
    def bits(self) -> int:
        """8: int8 codes; 4: nibbles 0..15."""
        return 8 if self.q.dtype == torch.int8 else 4

    @property
    def shape(self) -> tuple[int, int]:
        out_f, cols = self.q.shape
        return out_f, cols * 8 // self.bits

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
    codes = as_t(q.astype(np.int8), in_f)
    packed = PackedBlocks(codes, as_t(scale, in_f // group), None if mn is None else as_t(mn, in_f // group), group)
    return with_bits(packed, _PACKED_BITS.get(qtype, 8))


def codes(p: PackedBlocks) -> torch.Tensor:  # -> [out, in] int8
    """The codes one int8 each, whatever the storage."""
    if p.bits == 8:
        return p.q
    units = p.q.view(p.q.shape[0], -1, UNIT // 2)                                          # [out, in / 32, 16]
    return torch.stack([units & 0x0F, units >> 4], dim=2).view(p.q.shape[0], -1).to(torch.int8)


def with_bits(p: PackedBlocks, bits: int) -> PackedBlocks:
    """The same weights with codes stored as `bits`: 8 (int8) or 4 (nibbles), which needs codes 0..15, groups of
    32 and normal (or zero) scales of at most 20 significant bits (Q4_K's have 17), so that scale * q is exact in
    fp32 and the kernel may fuse `scale * q - min` into one multiply-subtract with the same rounding."""
    if bits == p.bits:
        return p
    q = codes(p)
    if bits == 8:
        return PackedBlocks(q, p.scale, p.min, p.group)
    short = ~(p.scale.view(torch.int32) & 0xF).bool() & ((p.scale == 0) | (p.scale.abs() >= torch.finfo().tiny))
    if bits != 4 or p.group != UNIT or int(q.min()) < 0 or int(q.max()) > 15 or not bool(short.all()):
        raise ValueError(f"codes do not fit {bits} bits (nibbles: codes 0..15, groups of {UNIT}, short scales)")
    units = q.view(torch.uint8).view(q.shape[0], -1, 2, UNIT // 2)
    return PackedBlocks((units[:, :, 0] | units[:, :, 1] << 4).reshape(q.shape[0], -1).contiguous(),
                        p.scale, p.min, p.group)


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
    per_byte = 8 // p.bits  # codes per byte: nibbles come in 32-column units, and their groups are 32 wide
    return PackedBlocks(p.q[:, start // per_byte: stop // per_byte].contiguous(), p.scale[:, g0:g1].contiguous(),
                        None if p.min is None else p.min[:, g0:g1].contiguous(), p.group)


def concat_rows(parts: list[PackedBlocks]) -> PackedBlocks:
    """Stack weights with the same input width into one (a fused q/k/v or gate/up projection).

    Mixed groups regroup to 16 (a 32-group's scale repeated: the same weights) and a missing min becomes 0,
    both exact, since `scale * q - 0` rounds as `scale * q`. Codes keep their storage if all parts share it,
    else all become int8 (a Q4_K stacked on a Q5_0 or Q6_K).
    """
    group = min(p.group for p in parts)
    bits = max(p.bits for p in parts)
    parts = [with_bits(p, bits) for p in parts]
    regroup = lambda t, g: t.repeat_interleave(g // group, dim=1)  # noqa: E731
    has_min = any(p.min is not None for p in parts)
    mins = [regroup(p.min if p.min is not None else torch.zeros_like(p.scale), p.group) for p in parts]
    return PackedBlocks(torch.cat([p.q for p in parts]), torch.cat([regroup(p.scale, p.group) for p in parts]),
                        torch.cat(mins) if has_min else None, group)


def dequantize_packed(p: PackedBlocks) -> torch.Tensor:  # -> [out, in] fp32
    """The packed weight as fp32, rounded like the kernels: one product, then one subtraction."""
    scale = p.scale.repeat_interleave(p.group, dim=1)
    w = scale * codes(p).float()
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
_PACKED_BITS = {Q.Q4_K: 4}  # stored as nibbles (module docstring); the others keep int8 codes
