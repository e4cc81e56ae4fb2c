"""x @ W^T straight from quantized blocks (block_layout.PackedBlocks): the compiled kernel and its torch twin.

Why C++ and not numba: measured on this 2-core AVX2/AVX-512 CPU, one 2048x640 Q5_0-shaped weight, 1 thread,
best of 30 (us):

    rows                         1      4     16
    block_mm.cpp (AVX2)         74    137    539
    numba, 32-lane accumulator 110   2200   7300    (the same layout; its few-row loop re-reads x per row)
    torch fp32 mm (dequantized) 100    297    556

Over the default GGUF's body (72 fused matrices, 117 MB as blocks vs 401 MB fp32; benchmarks/quant_blocks.py
--fused, 2 threads, OMP_WAIT_POLICY=passive, machine shared at load ~3), ms per step, block / fp32 mm / today's
Linear: 1 row 9.3 / 30.0 / 28.3, 4 rows 14.5 / 43.2 / 24.9, 16 rows 52.8 / 75.1 / 42.7, 64 rows 149 / 169 / 128.
Software prefetch made 1 and 4 rows 2.0x and 1.5x faster (18.5 and 22.0 ms before): without it a thread read
the interleaved weight rows at ~5 GB/s. From 16 rows the product is compute-bound and oneDNN's pre-packed
fp32 Linear is still ~20% faster.

Two builds of the one source (Isa): AVX2, and where torch reports AVX512 an AVX-512VL build whose 32 ymm
registers hold 4x6 register tiles (Zen 4 runs zmm as two ymm halves, so ymm with 32 registers is as fast). One
thread, best of 15 interleaved, us, the default GGUF's layer-0 matrices, busy shared machine (load 4-7):

    rows                      1        6          8          12         16
    gate_up 4096x640 AVX2     144      486-489    591-603    893-910    1146-1275
    gate_up   AVX-512VL       143      441-468    559-607    893        1094-1247
    down 640x2048 AVX2        73       255-267    319-324    476-480    683-699
    down      AVX-512VL       73       231-252    333-346    457        581-605

Q4_K codes are nibbles (block_layout.py); measured on one thread they cost 43 -> 46 us (o_proj, 1 row) in
unpacking while streaming 40% fewer bytes, so they pay where two threads share the memory bus; Q5_0 as nibbles
plus a 5th-bit plane cost 145 -> 227 us (gate_up, 1 row) and stays int8. The whole body (72 fused matrices,
2 threads, interleaved in one process, machine shared at load ~2), this kernel over 105 MB (Q4_K nibbles, AVX-512VL
build) vs the AVX2-only int8 kernel before it over 117 MB, ms: 1 row 6.8 vs 7.5, 4 rows 10.3 vs 10.4, 8 rows 16.8 vs
17.2, 16 rows 27.7 vs 30.9 (outputs bitwise equal). Python and dispatch cost ~1.3 us per call (0.1 ms per step).
The AVX-512VL build turns nibbles into weights through the group's 16 possible weights (vpermt2ps on the widened
code bytes: 2 ops per 8 weights instead of 4); the default GGUF's 27 nibble matrices, 1 row, interleaved with the
previous build in one process, outputs bitwise equal: 2 threads 1.34 -> 1.15 ms per step, 1 thread 2.50 -> 2.08;
4 rows 1.76 vs 1.78 (multiply-adds bind there).

The kernel is built on first use with torch.utils.cpp_extension (needs a C++ compiler and ninja) and cached
by torch; where it cannot be built or run (no compiler, no AVX2) `compiled()` is None, `block_mm` computes
through `reference_mm`, and models/quant_blocks.use_blocks keeps the dequantized fp32 Linears instead.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import platform
import time
from enum import Enum
from pathlib import Path
from types import ModuleType

import torch

from treespec.kernels.block_layout import PackedBlocks, dequantize_packed

_SOURCE = Path(__file__).with_name("block_mm.cpp")
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))  # shared by the kernels; their hash is a build flag: an edit rebuilds
# -ffp-contract=off keeps `scale * q - min` two roundings, as the reference rounds it
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
_NO_MIN = torch.empty(0)
STALE_LOCK_S = 600.0  # a kernel builds in about a minute; a lock file older than this is a killed build's
log = logging.getLogger(__name__)


class Isa(Enum):
    """Which build of a kernel source: the same source and the same per-output chains, other register tiles."""
    AVX2 = ()
    AVX512 = ("-mavx512f", "-mavx512vl", "-DTREESPEC_WIDE_TILES")  # 32 ymm registers: wider tiles


def host_isa() -> Isa | None:
    """The widest build this CPU runs (torch's own dispatch check), None where not even AVX2 (or not x86)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return {"AVX2": Isa.AVX2, "AVX512": Isa.AVX512}.get(torch.backends.cpu.get_cpu_capability())


def runnable_isas() -> list[Isa]:
    """Every build this CPU runs: an AVX-512 CPU runs the AVX2 build too."""
    host = host_isa()
    return [] if host is None else [isa for isa in Isa if isa in (Isa.AVX2, host)]


@functools.cache
def compiled() -> ModuleType | None:
    """The built extension for this CPU, or None (logged once) where it cannot be built or would not run here."""
    isa = host_isa()
    if isa is None:
        log.warning("block kernel needs an x86 CPU with AVX2; quantized weights stay dequantized fp32")
        return None
    return build(_SOURCE, isa)


@functools.cache
def variant(isa: Isa) -> ModuleType | None:
    """One build of the body kernel whatever this CPU would pick (tests and benchmarks compare them); the caller
    checks that the CPU runs it."""
    return compiled() if isa is host_isa() else build(_SOURCE, isa)


def build(source: Path, isa: Isa = Isa.AVX2, flags: tuple[str, ...] = ()) -> ModuleType | None:
    """Compile (once per machine and torch version, cached by torch) and load one kernel source; None, logged,
    where that fails. Callers check that the CPU runs `isa` first (compiled()), and whatever extra `flags`
    (e.g. -mavx512bf16) need."""
    # one build per source path (checkouts side by side never rebuild each other's), and per version of lanes.h
    tag = "" if isa is Isa.AVX2 else f"_{isa.name.lower()}"
    name = f"treespec_{source.stem}{tag}_{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]}"
    log.info("loading %s (compiled once per machine and torch version: about a minute)", name)
    try:
        from torch.utils import cpp_extension
        _drop_stale_lock(build_dir(name))
        header = hashlib.sha256(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:16]
        return cpp_extension.load(name=name, sources=[str(source)],
                                  extra_cflags=[*_CFLAGS, *isa.value, *flags, f"-DKERNEL_HEADERS={header}"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except (OSError, RuntimeError, ImportError) as e:  # no compiler or ninja, or a failed build
        first = str(e).splitlines()[0] if str(e) else repr(e)
        log.warning("%s unavailable (%s); quantized weights stay dequantized fp32", name, first)
        return None


def build_dir(name: str) -> Path:
    """Where torch builds (and locks) the extension `name`: its cache root, a python/CUDA-version folder, the name."""
    from torch.utils import cpp_extension
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def _drop_stale_lock(build_dir: Path) -> None:
    """A build killed half-way leaves torch's lock file behind, and every later load would wait on it forever;
    a lock older than any build takes is that leftover."""
    lock = build_dir / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            log.warning("removing %s, left by a build that did not finish", lock)
            lock.unlink()


def block_mm(x: torch.Tensor, w: PackedBlocks, ext: ModuleType | None = None) -> torch.Tensor:  # x: [T, in] fp32
    """x @ W^T -> [T, out] with W = w dequantized; each row's result is independent of the other rows (bitwise).
    ext: a particular build (variant()), else this CPU's."""
    return block_mm_parts(x, w.q, w.scale, w.min, w.group, ext)


def block_mm_parts(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, group: int,
                   ext: ModuleType | None = None) -> torch.Tensor:  # x: [T, in] fp32 -> [T, out]
    """block_mm of the PackedBlocks (q, scale, mins, group), taking its parts: a module holding them as buffers
    builds no PackedBlocks per call (a decode step makes 72 of these calls)."""
    ext = ext or compiled()
    if ext is None:
        return reference_mm(x, PackedBlocks(q, scale, mins, group))
    return ext.block_mm(x.contiguous(), q, scale, _NO_MIN if mins is None else mins, group)


def reference_mm(x: torch.Tensor, w: PackedBlocks) -> torch.Tensor:  # x: [T, in] -> [T, out]
    """The obviously-correct twin: dequantize, then torch's fp32 product."""
    return x @ dequantize_packed(w).t()
