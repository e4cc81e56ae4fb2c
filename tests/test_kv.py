"""KV cache with a real (tiny) model: committing an accepted tree path leaves exactly the cache a plain prefill
of the accepted text builds; truncation, growth, pending slots over several forwards, the length limit."""
from __future__ import annotations

import pytest
import torch

from tiny_hf import VOCAB, ancestor_mask, branch, decode, depths, hf_model, prefill, twin
from treespec.attention.metadata import SeqAttention

ATOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return twin(hf_model(request.param))


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _assert_same_cache(a, b) -> None:
    n = b.length
    assert a.length == n and a.pending == 0
    torch.testing.assert_close(a.k[:, :, :n], b.k[:, :, :n], atol=ATOL, rtol=0)
    torch.testing.assert_close(a.v[:, :, :n], b.v[:, :, :n], atol=ATOL, rtol=0)
    assert torch.equal(a.pos[:n], torch.arange(n))


@torch.inference_mode()
def test_commit_of_a_tree_path_equals_prefill_of_the_accepted_text(model):
    prompt, tree = _tokens(10, 0), _tokens(8, 1)
    parents = [-1, 0, 0, 1, 2, 2, 4, 6]
    cache, _ = prefill(model, prompt)
    positions = len(prompt) + torch.tensor(depths(parents))
    cache.reserve(8, positions)
    model(tree, positions, [SeqAttention(cache, 0, 8, ancestor_mask(parents))])
    path = branch(parents, 6)  # [0, 2, 4, 6]
    cache.commit(path)
    plain, _ = prefill(model, torch.cat([prompt, tree[path]]))
    _assert_same_cache(cache, plain)
    torch.testing.assert_close(decode(model, cache, 5), decode(model, plain, 5), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_truncate_then_decode_equals_prefill_of_the_kept_prefix(model):
    tokens = _tokens(14, 2)
    cache, _ = prefill(model, tokens)
    cache.truncate(9)
    h = decode(model, cache, 7)
    plain, h_plain = prefill(model, torch.cat([tokens[:9], torch.tensor([7])]))
    torch.testing.assert_close(h, h_plain[-1:], atol=ATOL, rtol=0)
    _assert_same_cache(cache, plain)


@torch.inference_mode()
def test_chunked_prefill_across_growth_equals_one_shot(model):
    tokens = _tokens(300, 3)  # the cache grows past its first 256 slots
    one_shot, h_one = prefill(model, tokens, max_len=400)
    cache = model.new_cache(400)
    for start in range(0, 300, 100):
        chunk = tokens[start:start + 100]
        cache.reserve(len(chunk))
        h = model(chunk, torch.arange(start, start + 100), [SeqAttention(cache, 0, 100)])
        cache.commit()
    assert cache.capacity >= 300
    _assert_same_cache(cache, one_shot)
    torch.testing.assert_close(h, h_one[200:], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_tree_grown_level_by_level_equals_one_tree_forward(model):
    """Pending slots stay visible across forwards until commit (a drafter growing its tree level by level)."""
    prompt, tree = _tokens(9, 4), _tokens(6, 5)
    parents = [-1, 0, 0, 1, 1, 2]
    full = ancestor_mask(parents)
    positions = len(prompt) + torch.tensor(depths(parents))
    cache, _ = prefill(model, prompt)
    cache.reserve(6, positions)
    h_once = model(tree, positions, [SeqAttention(cache, 0, 6, full)])
    cache, _ = prefill(model, prompt)
    cache.reserve(3, positions[:3])
    h_first = model(tree[:3], positions[:3], [SeqAttention(cache, 0, 3, full[:3, :3])])
    cache.reserve(3, positions[3:])
    h_second = model(tree[3:], positions[3:], [SeqAttention(cache, 0, 3, full[3:, :6])])
    torch.testing.assert_close(torch.cat([h_first, h_second]), h_once, atol=ATOL, rtol=0)


def test_exceeding_max_len_raises(model):
    cache = model.new_cache(8)
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        cache.reserve(9)
    cache.reserve(5)
    cache.commit()
    with pytest.raises(ValueError):
        cache.reserve(4)
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim) == (
        model.config.num_layers, model.config.num_kv_heads, model.config.head_dim)
