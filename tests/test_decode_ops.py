"""kernels/decode_ops: RMSNorm and few-row attention against torch's twins (fp64 products for the bound), and
per-row independence: a row's result is the same bitwise whether computed alone or among 1..64 rows."""
from __future__ import annotations

import pytest
import torch

from treespec.attention import reference_attention, sdpa_attention
from treespec.kernels import decode_ops

needs_kernel = pytest.mark.skipif(decode_ops.compiled() is None, reason="decode kernels cannot be built here")
ROWS = (1, 2, 3, 5, 16, 17, 64)


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", (8, 640, 2056))
def test_rms_norm_matches_torch(rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows * dim)
    x, w = torch.randn(rows, dim, generator=g) * 3, torch.randn(dim, generator=g)
    torch.testing.assert_close(decode_ops.rms_norm(x, w, 1e-6), decode_ops.reference_rms_norm(x, w, 1e-6),
                               rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_per_head_weight_on_a_strided_slice(rows: int) -> None:
    """q/k heads sliced out of a fused q/k/v output (rows strided), one weight row per head."""
    g = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, 7 * 16, generator=g)
    qk = qkv[:, :5 * 16].view(rows, 5, 16)
    w = torch.randn(5, 16, generator=g)
    got = decode_ops.rms_norm(qk, w, 1e-6)
    assert got.shape == qk.shape
    torch.testing.assert_close(got, decode_ops.reference_rms_norm(qk, w, 1e-6), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_rms_norm_rows_are_independent() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 640, generator=g), torch.randn(640, generator=g)
    together = decode_ops.rms_norm(x, w, 1e-6)
    for n in ROWS:
        assert torch.equal(decode_ops.rms_norm(x[:n], w, 1e-6), together[:n])
    assert torch.equal(decode_ops.rms_norm(x[37:38], w, 1e-6), together[37:38])


def cache_views(kv: int, length: int, hd: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V as the KV cache hands them out: [KV, L, hd] views into a longer buffer (rows strided)."""
    k = torch.randn(2, kv, length + 9, hd, generator=g)
    v = torch.randn(2, kv, length + 9, hd, generator=g)
    return k[1, :, 3:length + 3], v[1, :, 3:length + 3]


@needs_kernel
@pytest.mark.parametrize("heads,kv", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("n", (1, 2, 7, 16, 64))
@pytest.mark.parametrize("masked", (False, True))
def test_attention_matches_the_reference(heads: int, kv: int, n: int, masked: bool) -> None:
    g = torch.Generator().manual_seed(heads * 100 + n)
    length, hd = n + 40, 32
    q = torch.randn(heads, n, hd, generator=g)
    k, v = cache_views(kv, length, hd, g)
    mask = None
    if masked:  # a tree's mask: the committed prefix visible, pending slots random, each row sees itself
        mask = torch.ones(n, length, dtype=torch.bool)
        mask[:, 40:] = torch.rand(n, n, generator=g) < 0.4
        mask[:, 40:] |= torch.eye(n, dtype=torch.bool)
        mask[:, :5] = False  # a window that starts later
    got = decode_ops.attention(q, k, v, mask, 0.125)
    want = reference_attention(q.double(), k.double(), v.double(), mask, 0.125).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_attention_rows_are_independent() -> None:
    """Row i of a 64-row call equals row i computed alone, with its own mask row (bitwise)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 64, 256, generator=g)
    k, v = cache_views(1, 150, 256, g)
    mask = torch.rand(64, 150, generator=g) < 0.7
    mask[:, 0] = True
    together = decode_ops.attention(q, k, v, mask, 0.0625)
    for n in ROWS:
        assert torch.equal(decode_ops.attention(q[:, :n], k, v, mask[:n], 0.0625), together[:, :n])
    for i in (0, 31, 63):
        assert torch.equal(decode_ops.attention(q[:, i:i + 1], k, v, mask[i:i + 1], 0.0625), together[:, i:i + 1])


@needs_kernel
@pytest.mark.parametrize("n,hd", [(1, 256), (3, 40), (64, 256)])
def test_long_rows_split_across_threads_do_a_row_alones_arithmetic(n: int, hd: int) -> None:
    """From decode_ops.h's kSplitFromKeys keys the scores run split by keys and the values by columns; the
    arithmetic is still each row's own: keys the mask hides change nothing, so 300 keys with the last 100 hidden
    equal the first 200 (one thread per head's row) bit for bit, a row alone equals it within the batch, and both
    match the float64 reference."""
    g = torch.Generator().manual_seed(n)
    q = torch.randn(4, n, hd, generator=g)
    k, v = cache_views(1, 300, hd, g)
    mask = torch.rand(n, 300, generator=g) < 0.8
    mask[:, 0] = True
    mask[:, 200:] = False
    long = decode_ops.attention(q, k, v, mask, 0.0625)
    assert torch.equal(long, decode_ops.attention(q, k[:, :200], v[:, :200], mask[:, :200].contiguous(), 0.0625))
    assert torch.equal(long[:, -1:], decode_ops.attention(q[:, -1:], k, v, mask[-1:], 0.0625))
    want = reference_attention(q.double(), k.double(), v.double(), mask, 0.0625).float()
    torch.testing.assert_close(long, want, rtol=1e-5, atol=1e-5)


def test_more_rows_or_gradients_go_to_torch() -> None:
    q, k, v = torch.randn(2, decode_ops.MAX_KERNEL_ROWS + 1, 16), torch.randn(1, 80, 16), torch.randn(1, 80, 16)
    assert decode_ops.attention(q, k, v, None, 0.25) is None
    torch.testing.assert_close(sdpa_attention(q, k, v, None, 0.25), reference_attention(q, k, v, None, 0.25),
                               rtol=1e-5, atol=1e-5)
    assert decode_ops.attention(q[:, :1].clone().requires_grad_(), k, v, None, 0.25) is None
    w = torch.ones(16, requires_grad=True)
    decode_ops.rms_norm(torch.randn(3, 16), w, 1e-6).sum().backward()  # the torch twin keeps autograd
    assert w.grad is not None
