"""kernels/decode_ops' decoder-layer glue (qk_norm_rope, cached_attention, residual_norm, act_mul) against the torch
ops it replaces, and whole models with the glue on against the same models through torch's ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_hf import FAMILIES, ancestor_mask, hf_model, twin
from treespec.attention.metadata import SeqAttention
from treespec.kernels import decode_ops
from treespec.kv.cache import KVCache
from treespec.models.layers import apply_rope

needs_kernel = pytest.mark.skipif(decode_ops.compiled() is None, reason="decode kernels cannot be built here")
ROWS = (1, 3, 16, 64)


def rope_twin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x: [T, P, hd]
    """The kernel's rounding spelled out: x cos rounded, then rot(x) sin + that in one rounding (float64 holds the
    product exactly)."""
    rot = x.roll(x.shape[-1] // 2, dims=-1)
    return ((x * cos).double() + rot.double() * sin.double()).float()


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("normed", (True, False))
def test_qk_norm_rope_matches_torch(rows: int, normed: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    heads, hd = 5, 32  # 4 query heads + 1 K/V head, then the V head's columns
    qkv = torch.randn(rows, 6 * hd, generator=g) * 2
    w = torch.randn(heads, hd, generator=g) if normed else None
    cos, sin = torch.randn(rows, 1, hd, generator=g), torch.randn(rows, 1, hd, generator=g)
    got = decode_ops.qk_norm_rope(qkv, w, 1e-6, cos, sin, heads)
    qk = qkv[:, :heads * hd].view(rows, heads, hd)
    normed_qk = qk if w is None else decode_ops.rms_norm(qk, w, 1e-6)
    assert torch.equal(got, rope_twin(normed_qk, cos, sin))
    torch.testing.assert_close(got, apply_rope(normed_qk, cos, sin), rtol=1e-6, atol=1e-6)  # torch's own ops
    for i in (0, rows - 1):  # a row alone: the same bits
        assert torch.equal(decode_ops.qk_norm_rope(qkv[i:i + 1], w, 1e-6, cos[i:i + 1], sin[i:i + 1], heads),
                           got[i:i + 1])


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
def test_residual_norm_rounds_as_the_separate_ops(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    x, y = torch.randn(rows, 640, generator=g), torch.randn(rows, 640, generator=g) * 4
    w, w2 = torch.randn(640, generator=g), torch.randn(640, generator=g)
    h, z = decode_ops.residual_norm(x, y, w, 1e-6, w2)
    want = x + decode_ops.rms_norm(y, w, 1e-6)
    assert torch.equal(h, want) and torch.equal(z, decode_ops.rms_norm(want, w2, 1e-6))
    (only,) = decode_ops.residual_norm(x, y, w, 1e-6)
    assert torch.equal(only, want)


@needs_kernel
@pytest.mark.parametrize("act,fn", [("silu", F.silu), ("gelu_pytorch_tanh", lambda t: F.gelu(t, approximate="tanh"))])
@pytest.mark.parametrize("scale", (1.0, 10.0, 60.0))
def test_act_mul_matches_torchs_activation(act: str, fn, scale: float) -> None:
    """Within a few ulp of act(gate) * up in float64 (as close as torch's own), measured against |gate * up|:
    the activation's factor is a sigmoid, so its error is absolute; saturated and signed-zero inputs included."""
    gate_up = torch.randn(9, 2 * 96, generator=torch.Generator().manual_seed(3)) * scale
    gate_up[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0, 20.0, -20.0])
    gate, up = gate_up.chunk(2, dim=-1)
    got = decode_ops.act_mul(gate_up, decode_ops.ACTIVATION_CODES[act])
    exact = fn(gate.double()) * up.double()
    assert ((got.double() - exact).abs() <= 4e-7 * (gate.double() * up.double()).abs() + 1e-38).all()
    assert torch.equal(decode_ops.act_mul(gate_up[4:5], decode_ops.ACTIVATION_CODES[act]), got[4:5])  # rows alone


@needs_kernel
def test_act_mul_with_erf_gelu_is_torchs() -> None:
    gate_up = torch.randn(7, 2 * 80, generator=torch.Generator().manual_seed(3)) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(decode_ops.act_mul(gate_up, decode_ops.ACTIVATION_CODES["gelu"]), F.gelu(gate) * up)


@needs_kernel
@pytest.mark.parametrize("heads,kv", [(4, 1), (4, 2)])
def test_cached_attention_is_a_cache_write_then_attention(heads: int, kv: int) -> None:
    """Two requests in one flat batch (a 6-node tree after 30 committed tokens, a 1-row decode after 11): the same
    cache contents and outputs as cache.write + decode_ops.attention, bit for bit; a later window start too."""
    g = torch.Generator().manual_seed(heads * kv)
    hd, layer = 32, 1
    parents = [-1, 0, 0, 1, 1, 2]
    sizes, lengths = (6, 1), (30, 11)
    t = sum(sizes)
    qkv = torch.randn(t, (heads + 2 * kv) * hd, generator=g)
    qk = torch.randn(t, heads + kv, hd, generator=g)
    caches, twins = [], []
    for length in lengths:
        c = KVCache(3, kv, hd, 64)
        c.reserve(length)
        c.k[:, :, :length] = torch.randn(3, kv, length, hd, generator=g)
        c.v[:, :, :length] = torch.randn(3, kv, length, hd, generator=g)
        c.commit()
        twin_cache = KVCache(3, kv, hd, 64)
        twin_cache.reserve(length)
        twin_cache.k.copy_(c.k)
        twin_cache.v.copy_(c.v)
        twin_cache.commit()
        caches.append(c)
        twins.append(twin_cache)
    masks = [ancestor_mask(parents), None]
    out = torch.full((t, heads * hd), float("nan"))
    want = torch.empty(t, heads, hd)
    start = 0
    for n, c, tc, m, first in zip(sizes, caches, twins, masks, (4, 0)):
        c.reserve(n)
        tc.reserve(n)
        seq = SeqAttention(c, start, n, m)
        mask = seq.mask(torch.arange(c.length, c.length + n))[:, first:]
        decode_ops.cached_attention(qk, qkv, (start, n), c.k, c.v, layer, (c.visible - n, first), mask, 0.2, out)
        rows = slice(start, start + n)
        k_all, v_all = tc.write(layer, qk[rows, heads:].transpose(0, 1),
                                qkv[rows, (heads + kv) * hd:].view(n, kv, hd).transpose(0, 1))
        want[rows] = decode_ops.attention(qk[rows, :heads].transpose(0, 1), k_all[:, first:], v_all[:, first:],
                                          mask, 0.2).transpose(0, 1)
        end = c.visible  # only this layer's new slots were written; the rest of the buffer is uninitialised
        for a, b in ((c.k, tc.k), (c.v, tc.v)):
            assert torch.equal(a[layer, :, :end], b[layer, :, :end])
            assert torch.equal(a[:, :, :c.length], b[:, :, :c.length])
        start += n
    assert torch.equal(out, want.reshape(t, heads * hd))


@needs_kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_models_with_the_glue_equal_torchs_ops(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill, a 5-node tree and a decode step of each tiny family: hidden states and K/V caches with the glue
    equal those through torch's ops to float rounding (the activation differs from torch's by a few ulp)."""
    model = twin(hf_model(family))
    parents = [-1, 0, 0, 1, 2]
    p = decode_ops.MAX_KERNEL_ROWS + 6  # a prefill longer than the kernel's rows: K/V written by torch's ops
    prompt = torch.randint(0, model.config.vocab_size, (p,), generator=torch.Generator().manual_seed(0))

    def run() -> tuple[list[torch.Tensor], KVCache]:
        cache, outs = model.new_cache(p + 8), []
        with torch.inference_mode():
            for tokens, positions, mask in ((prompt, torch.arange(p), None),
                                            (prompt[:5], p + torch.tensor([0, 1, 1, 2, 2]), ancestor_mask(parents)),
                                            (prompt[:1], torch.tensor([p + 2]), None)):
                cache.reserve(len(tokens), positions if mask is not None else None)
                outs.append(model(tokens, positions, [SeqAttention(cache, 0, len(tokens), mask)]))
                cache.commit([0, 2] if mask is not None else None)
        return outs, cache

    calls = {"qk_norm_rope": 0, "cached_attention": 0, "act_mul": 0}
    for name in calls:
        monkeypatch.setattr(decode_ops, name, counted(calls, name, getattr(decode_ops, name)))
    glued, glued_cache = run()
    glue_attention = model.config.head_dim % 16 == 0
    assert calls == {"qk_norm_rope": 3 * model.config.num_layers * glue_attention,
                     "cached_attention": 2 * model.config.num_layers * glue_attention,  # not the prefill
                     "act_mul": 3 * model.config.num_layers}
    monkeypatch.setattr(decode_ops, "glue_runs", lambda x: False)
    plain, plain_cache = run()
    for a, b in zip(glued, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    n = glued_cache.length  # the slots after it were never written (uninitialised memory)
    assert n == plain_cache.length == p + 3
    torch.testing.assert_close(glued_cache.k[:, :, :n], plain_cache.k[:, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glued_cache.v[:, :, :n], plain_cache.v[:, :, :n], rtol=1e-5, atol=1e-5)


def counted(calls: dict[str, int], name: str, fn):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper


@needs_kernel
def test_the_glue_runs_only_without_autograd() -> None:
    x = torch.randn(2, 16)
    with torch.inference_mode():
        assert decode_ops.glue_runs(x) and not decode_ops.glue_runs(x.double())
    assert not decode_ops.glue_runs(x)  # autograd on: distill trains through torch's ops


@pytest.mark.parametrize("window", (None, 1, 4, 30))
def test_a_decode_steps_mask_is_the_general_one(window: int | None) -> None:
    """ForwardBatch.mask's shortcut for one chained row (no mask tensor) matches the general mask: every key
    from `first` on allowed."""
    from treespec.models.layers import ForwardBatch
    for length in (0, 3, 12):
        cache = KVCache(1, 1, 16, 64)
        cache.reserve(length)
        cache.commit()
        cache.reserve(1)
        seq = SeqAttention(cache, 0, 1)
        positions = torch.tensor([length])
        mask, first = ForwardBatch([seq], positions, {}).mask(0, window)
        general = seq.mask(positions, window)
        assert mask is None and bool(general[:, first:].all()) and not bool(general[:, :first].any())
