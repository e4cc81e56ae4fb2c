"""A GGUF file's metadata and tensor table, parsed and validated before any tensor data is touched.

`gguf.GGUFReader` builds one numpy view per array element, which costs ~12 s on Gemma's 262k-entry vocabulary
(tokens, scores, types); reading the same layout with `struct` over a memory map takes ~0.2 s. Every read is
bounds-checked, so a cut or corrupt file becomes one `ModelLoadError` line instead of a traceback.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key/value count, the key/values,
the tensor table (name, u32 n_dims, u64 dims fastest-first, u32 ggml type, u64 offset), then the data
section at the next multiple of `general.alignment` (default 32).
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from treespec.errors import ModelLoadError

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_COUNT = 1 << 24  # far above any real file; stops a corrupt count from looping for hours
_DEFAULT_ALIGNMENT = 32

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]      # torch order (slowest first): the reverse of GGUF's dims
    qtype: GGMLQuantizationType
    start: int                  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]    # numeric arrays as numpy arrays, string arrays as lists
    tensors: list[GGUFTensorInfo]
    buffer: np.ndarray          # the whole file as uint8, memory-mapped

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes (a view into the mapped file)."""
        return self.buffer[info.start: info.start + info.nbytes]


def read_gguf(path: Path) -> GGUFFile:
    """Parse and validate `path`; ModelLoadError on anything malformed."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ModelLoadError(f"{path}: {size} bytes is too small to be a GGUF file")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    cur = _Cursor(mm, path)
    if bytes(mm[:4]) != _MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (bad magic {bytes(mm[:4])!r})")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        what = "a big-endian GGUF" if swapped in _VERSIONS else f"GGUF version {version}"
        raise ModelLoadError(f"{path}: {what} is not supported (little-endian v2/v3 only)")
    n_tensors, n_kv = cur.count(), cur.count()
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(GGUFValueType(cur.enum("<I", GGUFValueType, key)))
    table = [_tensor_entry(cur) for _ in range(n_tensors)]
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path}: general.alignment={alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = [_place(path, e, data_start, alignment, len(mm)) for e in table]
    _check_layout(path, tensors)
    buffer = np.frombuffer(mm, dtype=np.uint8)
    return GGUFFile(Path(path), version, metadata, tensors, buffer)


def _tensor_entry(cur: "_Cursor") -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = cur.string()
    n_dims = cur.scalar("<I")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise ModelLoadError(f"{cur.path}: tensor {name!r} has {n_dims} dimensions (corrupt tensor table)")
    dims = [cur.scalar("<Q") for _ in range(n_dims)]
    qtype = GGMLQuantizationType(cur.enum("<I", GGMLQuantizationType, name))
    offset = cur.scalar("<Q")
    return name, tuple(reversed(dims)), qtype, offset


def _place(path: Path, entry: tuple, data_start: int, alignment: int, file_size: int) -> GGUFTensorInfo:
    name, shape, qtype, offset = entry
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ModelLoadError(f"{path}: tensor {name!r} row length {shape[-1]} is not a multiple of "
                             f"the {qtype.name} block size {block}")
    if offset % alignment:
        raise ModelLoadError(f"{path}: tensor {name!r} data offset {offset} is not {alignment}-byte aligned")
    nbytes = math.prod(shape) // block * type_size
    start = data_start + offset
    if start + nbytes > file_size:
        raise ModelLoadError(f"{path}: truncated: tensor {name!r} needs bytes {start}..{start + nbytes} "
                             f"but the file has {file_size}")
    return GGUFTensorInfo(name, shape, qtype, start, nbytes)


def _check_layout(path: Path, tensors: list[GGUFTensorInfo]) -> None:
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ModelLoadError(f"{path}: tensor {dup!r} appears twice in the tensor table")
    spans = sorted(tensors, key=lambda t: t.start)
    for a, b in zip(spans, spans[1:]):
        if a.start + a.nbytes > b.start:
            raise ModelLoadError(f"{path}: tensors {a.name!r} and {b.name!r} overlap (corrupt tensor table)")


class _Cursor:
    """Bounds-checked little-endian reads; running past the end means the file was cut short."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def _take(self, n: int) -> int:
        start, self.pos = self.pos, self.pos + n
        if self.pos > self.size:
            raise self._truncated()
        return start

    def _truncated(self) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: truncated: the file ends at byte {self.size}, "
                              f"mid-way through its metadata or tensor table")

    def scalar(self, fmt: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self._take(struct.calcsize(fmt)))[0]

    def count(self) -> int:
        n = self.scalar("<Q")
        if n > _MAX_COUNT:
            raise ModelLoadError(f"{self.path}: implausible count {n} in the header (corrupt file)")
        return n

    def enum(self, fmt: str, kind: type, where: str) -> int:
        v = self.scalar(fmt)
        if v not in kind._value2member_map_:
            raise ModelLoadError(f"{self.path}: unknown {kind.__name__} {v} at {where!r} (corrupt or newer file)")
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self._take(n)
        return self.buf[start: start + n].decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype is GGUFValueType.FLOAT32:  # shortest float32 spelling: 1e-06, not 9.999999974752427e-07
            return float(str(np.float32(self.scalar("<f"))))
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype is GGUFValueType.STRING:
            return self.string()
        etype = GGUFValueType(self.enum("<I", GGUFValueType, "array element type"))
        n = self.count()
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            start = self._take(n * struct.calcsize(fmt))
            return np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=start).copy()
        if etype is GGUFValueType.STRING:
            return self._strings(n)
        return [self.value(etype) for _ in range(n)]

    def _strings(self, n: int) -> list[str]:
        """n length-prefixed strings; the hot loop of a 262k-token vocabulary, so kept lean."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = []
        for _ in range(n):
            if pos + 8 > size:
                break
            k = unpack(buf, pos)[0]
            pos += 8
            if pos + k > size:
                break
            out.append(buf[pos: pos + k].decode("utf-8", errors="replace"))
            pos += k
        if len(out) < n:
            raise self._truncated()
        self.pos = pos
        return out
