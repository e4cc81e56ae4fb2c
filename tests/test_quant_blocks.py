"""Block kernels (kernels/block_mm.h) against their reference twin: the `gguf` package's dequantizers and an
fp64 product, on random blocks of every supported type; per-row independence; the opt-in model path."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from tiny_gguf import write_model
from tiny_hf import decode, prefill
from treespec.kernels import block_mm as kernel
from treespec.kernels.block_layout import (PackedBlocks, codes, concat_rows, dequantize_packed, map_rows, pack,
                                           slice_columns, with_bits)
from treespec.models import build_model
from treespec.models import quant_blocks
from treespec.models.quant_blocks import BlockQuantLinear, use_blocks
from treespec.weights.gguf_blocks import load_gguf_blocks
from treespec.weights.gguf_file import read_gguf
from treespec.weights.loader import load_checkpoint

TYPES = (Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K)
FP16_FIELDS = {Q.Q8_0: (0,), Q.Q5_0: (0,), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}  # byte offsets of d (and dmin)
ROWS = (*range(1, 21), 64)  # every pass split of the register tiles, direct and buffered
needs_kernel = pytest.mark.skipif(kernel.compiled() is None, reason="block kernel cannot be built here")
# every build this CPU runs (an AVX-512 machine also runs, and so tests, the AVX2 build CI machines may pick)
ISAS = kernel.runnable_isas()


def random_blocks(qtype: Q, out_f: int, in_f: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every block field, with finite fp16 scales of the size real files hold -> [nbytes]."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(out_f * in_f // block, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        d = (rng.standard_normal(len(raw)) * 0.01).astype(np.float16)
        raw[:, off: off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def reference(raw: np.ndarray, qtype: Q, shape: tuple[int, int], x: torch.Tensor):
    """fp64 product over the gguf-dequantized weight, and the rounding bound for an fp32 result of it."""
    w = torch.from_numpy(quants.dequantize(raw.reshape(shape[0], -1), qtype)).double()
    exact = x.double() @ w.t()
    # one 8-lane fp32 chain of in/8 fused multiply-adds, then 3 lane sums: |error| <= (in/8 + 3) u sum|x w|
    bound = (shape[1] / 8 + 4) * 2.0 ** -24 * (x.double().abs() @ w.abs().t())
    return exact, bound


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_packing_reproduces_gguf_dequantize_bitwise(qtype: Q) -> None:
    raw = random_blocks(qtype, 24, 512)
    ref = quants.dequantize(raw.reshape(24, -1), qtype)
    got = dequantize_packed(pack(raw, qtype, (24, 512))).numpy()
    assert np.array_equal(ref.view(np.int32), got.view(np.int32))


def build(isa: kernel.Isa):
    ext = kernel.variant(isa)
    if ext is None:
        pytest.skip(f"{isa.name} build unavailable here")
    return ext


@needs_kernel
@pytest.mark.parametrize("isa", ISAS, ids=lambda i: i.name)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("out_f", (1, 13, 37, 64))
def test_kernel_matches_reference(qtype: Q, out_f: int, isa: kernel.Isa) -> None:
    in_f = 512 if qtype in (Q.Q4_K, Q.Q6_K) else 96  # K-quants are 256-wide; 96 = three 32-blocks
    raw = random_blocks(qtype, out_f, in_f, seed=out_f)
    w = pack(raw, qtype, (out_f, in_f))
    torch.manual_seed(out_f)
    ext = build(isa)
    for rows in ROWS:
        x = torch.randn(rows, in_f)
        y = kernel.block_mm(x, w, ext)
        exact, bound = reference(raw, qtype, (out_f, in_f), x)
        assert y.shape == (rows, out_f) and y.dtype == torch.float32
        assert ((y.double() - exact).abs() <= bound).all(), f"rows={rows}"


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_a_rows_result_does_not_depend_on_the_other_rows_or_the_build(qtype: Q) -> None:
    """Lossless speculation: a tree's rows must not change each other's numbers, bit for bit; and every build
    (register tiles differ) computes the same chains."""
    in_f = 512
    w = pack(random_blocks(qtype, 45, in_f), qtype, (45, in_f))
    x = torch.randn(64, in_f)
    together = kernel.block_mm(x, w)
    for t in range(64):
        assert torch.equal(kernel.block_mm(x[t: t + 1], w)[0], together[t])
    for lo, hi in ((0, 3), (5, 22), (7, 64), (60, 64), (1, 14), *((0, n) for n in range(1, 21))):
        assert torch.equal(kernel.block_mm(x[lo:hi], w), together[lo:hi])
    for isa in ISAS:
        for n in (1, 5, 8, 12, 16, 64):
            assert torch.equal(kernel.block_mm(x[:n], w, build(isa)), together[:n]), (isa, n)


@needs_kernel
def test_thread_count_does_not_change_the_result() -> None:
    """Threads split the output rows only, so every output keeps its one accumulation chain."""
    w = pack(random_blocks(Q.Q6_K, 301, 512), Q.Q6_K, (301, 512))
    x = torch.randn(7, 512)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernel.block_mm(x, w)
        torch.set_num_threads(2)
        assert torch.equal(kernel.block_mm(x, w), alone)
    finally:
        torch.set_num_threads(threads)


def test_a_failed_build_means_no_kernel(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'treespec_block_mm'\nc++: not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    kernel.compiled.cache_clear()
    try:
        assert kernel.compiled() is None
    finally:
        kernel.compiled.cache_clear()
    assert "dequantized fp32" in caplog.text


def test_fallback_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    w = pack(random_blocks(Q.Q4_K, 9, 256), Q.Q4_K, (9, 256))
    x = torch.randn(3, 256)
    monkeypatch.setattr(kernel, "compiled", lambda: None)
    assert torch.equal(kernel.block_mm(x, w), kernel.reference_mm(x, w))


def test_concat_and_row_maps_keep_the_weights() -> None:
    """Fused projections may mix types: a Q6_K (16-groups) stacked on a Q4_K (mins) and a Q5_0."""
    parts = [(Q.Q6_K, 5), (Q.Q4_K, 3), (Q.Q5_0, 2)]
    packed = [pack(random_blocks(t, n, 256, seed=i), t, (n, 256)) for i, (t, n) in enumerate(parts)]
    fused = concat_rows(packed)
    assert fused.group == 16 and fused.min is not None
    expect = torch.cat([dequantize_packed(p) for p in packed])
    assert torch.equal(dequantize_packed(fused), expect)
    flipped = map_rows(fused, lambda t: t.flip(0))
    assert torch.equal(dequantize_packed(flipped), expect.flip(0))


@pytest.mark.parametrize(("parts", "bits"), [
    ([(Q.Q5_0, 4), (Q.Q5_0, 3), (Q.Q8_0, 2)], 8),  # Gemma 3's q/k/v where v is Q8_0
    ([(Q.Q5_0, 4), (Q.Q4_K, 3)], 8),
    ([(Q.Q4_K, 4), (Q.Q4_K, 3)], 4),               # nibbles stay nibbles
])
def test_concat_takes_the_widest_codes(parts: list[tuple[Q, int]], bits: int) -> None:
    packed = [pack(random_blocks(t, n, 256, seed=i), t, (n, 256)) for i, (t, n) in enumerate(parts)]
    fused = concat_rows(packed)
    assert fused.bits == bits and fused.shape == (sum(n for _, n in parts), 256)
    assert torch.equal(dequantize_packed(fused), torch.cat([dequantize_packed(p) for p in packed]))
    if kernel.compiled() is not None:
        x = torch.randn(5, 256)
        assert torch.equal(kernel.block_mm(x, fused), torch.cat([kernel.block_mm(x, p) for p in packed], dim=1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_packed_codes_round_trip_and_cut_on_unit_boundaries(qtype: Q) -> None:
    """Every storage the codes fit holds the same weights; rows map and columns cut on 32-boundaries as documented,
    and the kernel gives the same bits whatever the storage (the same weights, the same chains)."""
    p = pack(random_blocks(qtype, 13, 256, seed=3), qtype, (13, 256))
    w = dequantize_packed(p)
    q = codes(p)
    fits = [8, 4] if qtype is Q.Q4_K else [8]
    x = torch.randn(6, 256)
    for bits in fits:
        stored = with_bits(p, bits)
        assert stored.bits == bits and torch.equal(codes(stored), q) and torch.equal(dequantize_packed(stored), w)
        order = torch.randperm(13)
        assert torch.equal(dequantize_packed(map_rows(stored, lambda t: t[order])), w[order])
        assert torch.equal(dequantize_packed(slice_columns(stored, 64, 192)), w[:, 64:192])
        if kernel.compiled() is not None:
            assert torch.equal(kernel.block_mm(x, stored), kernel.block_mm(x, p))
    assert p.bits == (4 if qtype is Q.Q4_K else 8)  # the storage pack chooses
    if 4 not in fits:  # codes outside 0..15, groups of 16 (Q6_K)
        with pytest.raises(ValueError, match="do not fit"):
            with_bits(p, 4)
    else:  # a scale with more than 20 significant bits: scale * q might round, so the fused kernel step could differ
        long_scale = p.scale.view(torch.int32).bitwise_or(1).view(torch.float32)
        subnormal = p.scale.clone().index_fill_(0, torch.tensor([0]), 2.0 ** -130)  # 20 bits, but s * q may round
        for scale in (long_scale, subnormal):
            with pytest.raises(ValueError, match="do not fit"):
                with_bits(PackedBlocks(q, scale, p.min, p.group), 4)


def test_without_the_kernel_the_model_keeps_its_fp32_linears(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    write_model(path, "llama", qtypes=(Q.Q8_0,))
    ckpt = load_checkpoint(str(path))
    model = build_model(ckpt.config, ckpt.tensors)
    monkeypatch.setattr(quant_blocks, "compiled", lambda: None)
    assert use_blocks(model, load_gguf_blocks(read_gguf(path), ckpt.config)) == 0
    assert not any(isinstance(m, BlockQuantLinear) for m in model.modules())


@needs_kernel
def test_block_linear_adds_its_bias_like_a_linear() -> None:
    w = pack(random_blocks(Q.Q5_0, 20, 64), Q.Q5_0, (20, 64))
    bias = torch.randn(20)
    lin = BlockQuantLinear(w, bias)
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), x @ dequantize_packed(w).t() + bias, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("arch", "qtypes"), [
    ("gemma3", (Q.Q8_0, Q.Q5_0)), ("llama", (Q.Q8_0, Q.Q5_0)),
    ("llama", (Q.Q5_0, Q.F32, Q.Q8_0)),  # F32 weights stay dequantized Linears, with their fused partners
], ids=["gemma3", "llama", "llama-mixed"])
@torch.inference_mode()
def test_tiny_gguf_from_blocks_greedy_equals_dequantized(arch: str, qtypes: tuple[Q, ...], tmp_path: Path) -> None:
    path = tmp_path / f"{arch}.gguf"
    write_model(path, arch, qtypes=qtypes)
    ckpt = load_checkpoint(str(path))
    plain = build_model(ckpt.config, ckpt.tensors)
    blocks = build_model(ckpt.config, ckpt.tensors)
    swapped = use_blocks(blocks, load_gguf_blocks(read_gguf(path), ckpt.config))
    projections = 4 * ckpt.config["num_hidden_layers"]
    assert 0 < swapped < projections if Q.F32 in qtypes else swapped == projections
    prompt = torch.randint(0, ckpt.config["vocab_size"], (12,), generator=torch.Generator().manual_seed(0))
    outs, logits = [], []
    for model in (plain, blocks):
        cache, h = prefill(model, prompt)
        logits.append(model.logits(h))
        out = [int(model.lm_head.argmax(h[-1:]))]
        for _ in range(23):
            out.append(int(model.lm_head.argmax(decode(model, cache, out[-1]))))
        outs.append(out)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    assert outs[1] == outs[0]


def test_a_killed_builds_lock_is_removed_a_live_one_kept(tmp_path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    kernel._drop_stale_lock(tmp_path)
    assert lock.exists()  # a build in progress elsewhere: wait for it
    old = time.time() - kernel.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    kernel._drop_stale_lock(tmp_path)
    assert not lock.exists()
    kernel._drop_stale_lock(tmp_path)  # nothing there: nothing to do
    ext = kernel.compiled()
    if ext is not None:  # the folder looked at is the one torch built the kernel in
        assert Path(ext.__file__).parent == kernel.build_dir(ext.__name__)
