"""Attention kernels: reference == transformers' eager attention, SDPA == reference, and tree attention over a
committed prefix == ordinary causal attention over each node's own branch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from tiny_hf import ancestor_mask, branch, depths, random_parents
from treespec.attention import AttentionBackend, fast_attention, reference_attention, sdpa_attention, select_attention
from treespec.attention.metadata import SeqAttention
from treespec.kv.cache import KVCache

HD = 8
KERNELS = [reference_attention, sdpa_attention, fast_attention]


def _qkv(heads: int, kv_heads: int, n: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, n, HD, generator=g), torch.randn(kv_heads, length, HD, generator=g),
            torch.randn(kv_heads, length, HD, generator=g))


def _random_mask(n: int, length: int, seed: int) -> torch.Tensor:
    m = torch.rand(n, length, generator=torch.Generator().manual_seed(seed)) < 0.6
    m[:, -1] = True  # every query sees at least one key (itself, in a real forward)
    return m


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_reference_equals_transformers_eager(heads, kv_heads, softcap):
    q, k, v = _qkv(heads, kv_heads, 5, 9, seed=0)
    mask = _random_mask(5, 9, seed=1)
    additive = torch.zeros(5, 9).masked_fill(~mask, float("-inf"))
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, head_dim=HD)
    want, _ = eager_attention_forward(module, q[None], k[None], v[None], additive, scaling=0.3, softcap=softcap)
    got = reference_attention(q, k, v, mask, 0.3, softcap)
    torch.testing.assert_close(got, want[0].transpose(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("heads, kv_heads, n", [(4, 4, 1), (4, 2, 5), (8, 2, 16), (6, 1, 3)])
def test_sdpa_equals_reference(heads, kv_heads, n, masked):
    q, k, v = _qkv(heads, kv_heads, n, 23, seed=2)
    mask = _random_mask(n, 23, seed=3) if masked else None
    torch.testing.assert_close(sdpa_attention(q, k, v, mask, 0.25), reference_attention(q, k, v, mask, 0.25),
                               atol=1e-5, rtol=0)


def test_backend_choice():
    assert select_attention(None, None) is fast_attention
    assert select_attention(None, 30.0) is reference_attention
    assert select_attention(AttentionBackend.REFERENCE, None) is reference_attention
    with pytest.raises(ValueError, match="softcap"):
        select_attention(AttentionBackend.SDPA, 30.0)
    q, k, v = _qkv(2, 1, 1, 3, seed=4)
    with pytest.raises(ValueError, match="softcap"):
        sdpa_attention(q, k, v, None, 1.0, softcap=5.0)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kernel", KERNELS)
def test_tree_attention_equals_causal_attention_over_each_branch(kernel, window):
    heads, kv_heads, prefix, n = 4, 2, 7, 12
    gen = torch.Generator().manual_seed(5)
    parents = random_parents(n, gen)
    q, k, v = _qkv(heads, kv_heads, n, prefix + n, seed=6)
    cache = KVCache(1, kv_heads, HD, max_len=64)
    cache.reserve(prefix)
    cache.write(0, k[:, :prefix], v[:, :prefix])
    cache.commit()
    positions = prefix + torch.tensor(depths(parents))
    cache.reserve(n, positions)
    k_all, v_all = cache.write(0, k[:, prefix:], v[:, prefix:])
    seq = SeqAttention(cache, 0, n, ancestor_mask(parents))
    tree_out = kernel(q, k_all, v_all, seq.mask(positions, window), 0.4)  # [H, n, hd]
    for i in range(n):
        keys = list(range(prefix)) + [prefix + j for j in branch(parents, i)]  # ends with node i itself
        key_pos = torch.tensor(list(range(prefix)) + [prefix + d for d in range(len(keys) - prefix)])
        causal = torch.ones(1, len(keys), dtype=torch.bool)
        if window is not None:
            causal &= (key_pos[-1] - key_pos < window)[None]
        want = reference_attention(q[:, i:i + 1], k[:, keys], v[:, keys], causal, 0.4)
        torch.testing.assert_close(tree_out[:, i:i + 1], want, atol=1e-5, rtol=0)
