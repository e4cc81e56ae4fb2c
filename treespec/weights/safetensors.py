"""Hugging Face safetensors checkpoints (single file or sharded), header-validated before any data is used.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the tensor bytes, with
offsets relative to the end of the header. We check the whole header ourselves, so a cut or doctored file
fails with one line naming the file and tensor, and only then hand the file to `safetensors` (mmap).
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from treespec.errors import ModelLoadError

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FLOAT = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> list[TensorEntry]:
    """The validated tensor table of one .safetensors file, in file order."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise ModelLoadError(f"{path}: bad safetensors header length ({n}) for a {size}-byte file "
                                     f"(truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ModelLoadError(f"{path}: safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    entries = sorted((_entry(path, k, v) for k, v in header.items()), key=lambda e: (e.begin, e.end))
    _check_spans(path, entries, size - 8 - n)
    return entries


def _entry(path: Path, name: str, v: Any) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(v, dict):
        raise ModelLoadError(f"{where}: header entry is not an object")
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise ModelLoadError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelLoadError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ModelLoadError(f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
        raise ModelLoadError(f"{where}: {offsets[1] - offsets[0]} bytes do not hold shape {shape} of {dtype}")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_spans(path: Path, entries: list[TensorEntry], data_len: int) -> None:
    """Tensors tile the data section exactly: in order, no overlap, no gap, nothing past the end."""
    pos = 0
    for e in entries:
        if e.begin != pos:
            what = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap at byte {pos}"
            raise ModelLoadError(f"{path}: tensor {e.name!r} {what} (corrupt header)")
        pos = e.end
    if pos != data_len:
        what = "truncated" if pos > data_len else "trailing bytes after the last tensor"
        raise ModelLoadError(f"{path}: {what}: the header describes {pos} data bytes, the file holds {data_len}")


def shard_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards listed by model.safetensors.index.json."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        paths = [_shard_path(index, directory, f) for f in files]
        missing = [f for f, p in zip(files, paths) if not p.is_file()]
        if missing:
            raise ModelLoadError(f"{directory}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return paths
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if pickles := sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")):
        raise ModelLoadError(f"{directory}: only pickle checkpoints ({', '.join(pickles[:3])}) found; they are "
                             f"refused because loading them can run arbitrary code: convert to safetensors")
    raise ModelLoadError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def _shard_path(index: Path, directory: Path, name: Any) -> Path:
    """A weight_map entry as a path that stays inside the model directory once resolved (symlinks followed), so a
    doctored index cannot read files elsewhere. A Hugging Face cache snapshot links its files into the repo's
    blobs/ folder, so there the repo folder (two levels up) is the boundary."""
    if not isinstance(name, str):
        raise ModelLoadError(f"{index}: weight_map entry {name!r} is not a file name")
    root = directory.resolve()
    if root.parent.name == "snapshots":
        root = root.parent.parent
    path = directory / name
    try:
        inside = path.resolve().is_relative_to(root)
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ModelLoadError(f"{index}: weight_map entry {name!r} cannot be resolved ({e})") from None
    if not inside:
        raise ModelLoadError(f"{index}: weight_map entry {name!r} points outside the model directory; refused")
    return path


def load_safetensors_dir(directory: Path, progress: bool = False
                         ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, int]]:
    """(config.json, fp32 tensors by HF name, dtype counts) of an HF model directory."""
    config = _config(directory)
    files = shard_files(directory)
    tables = {f: read_header(f) for f in files}
    tensors: dict[str, torch.Tensor] = {}
    counts: Counter[str] = Counter()
    bar = tqdm(total=sum(len(t) for t in tables.values()), desc="loading", unit="tensor", disable=not progress,
               leave=False)
    for f, entries in tables.items():
        with safe_open(str(f), framework="pt") as st:
            for e in entries:
                if e.name in tensors:
                    raise ModelLoadError(f"{f}: tensor {e.name!r} also appears in another shard")
                t = st.get_tensor(e.name)
                tensors[e.name] = t.float() if e.dtype in _FLOAT else t
                counts[e.dtype] += 1
                bar.update()
    bar.close()
    return config, _language_model_only(config, tensors), dict(counts)


def _config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{path}: not an HF config (no model_type)")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(f"{path}: pre-quantized checkpoints ({method}) are not supported; use the "
                             f"bf16/fp16/fp32 weights or a GGUF")
    return config


# multimodal Gemma 3 checkpoints: the text model's parameters under a prefix (transformers 4.x, then 5.x)
_LANGUAGE_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                      ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def _language_model_only(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For a multimodal "gemma3" checkpoint keep the text model, renamed as Gemma3ForCausalLM names it."""
    if config.get("model_type") != "gemma3":
        return tensors
    out = {}
    for name, t in tensors.items():
        for old, new in _LANGUAGE_PREFIXES:
            if name.startswith(old):
                out[new + name[len(old):]] = t
                break
    return out
