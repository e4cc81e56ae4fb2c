"""LMHead: fp32 logits against h @ W^T, and the fp16-screened argmax against logits(h).argmax(-1) on heads full of
near-ties (the oracle is the obvious slow twin; a deliberately too-small bound must make the test fail)."""
import pytest
import torch

from treespec.models.lm_head import (MIN_SCREEN_VOCAB, Fp16Screen, LMHead, block_maxima, entries_at_least,
                                     fp16_ops_available)

V, D = 20_000, 64
needs_fbgemm = pytest.mark.skipif(not fp16_ops_available(), reason="fbgemm fp16 ops not in this torch build")


def random_head(seed: int = 0, v: int = V) -> torch.Tensor:  # -> [v, D]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, D, generator=g) * 0.1


def planted_states(w: torch.Tensor, winners: torch.Tensor, seed: int = 1) -> torch.Tensor:  # -> [T, D]
    """Hidden states pointing at given rows, so those rows (and their near-twins) lead the logits."""
    g = torch.Generator().manual_seed(seed)
    direction = w[winners] / w[winners].norm(dim=1, keepdim=True)
    return 30.0 * direction + torch.randn(len(winners), D, generator=g)


TWIN_KINDS = ("rel1e-3", "rel1e-4", "rel1e-5", "rel1e-7", "one_ulp", "duplicate")


def near_tie_head(seed: int = 0, groups: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A head where each of `groups` anchor rows has twins scattered at random ids (below and above it): relative
    perturbations from 1e-3 (reordered by fp16 rounding) down to 1e-7, a 1-ulp change and an exact copy."""
    w = random_head(seed)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randperm(V, generator=g)[: groups * (1 + len(TWIN_KINDS))].view(groups, -1)
    for row in ids:
        base = w[row[0]].clone()
        for twin, kind in zip(row[1:], TWIN_KINDS):
            if kind.startswith("rel"):
                eps = float(kind[3:])
                w[twin] = base * (1 + eps * torch.randn(D, generator=g))
            elif kind == "one_ulp":
                w[twin] = base
                j = int(torch.randint(D, (1,), generator=g))
                w[twin, j] = torch.nextafter(base[j], torch.tensor(float("inf")))
            else:
                w[twin] = base
    return w, ids[:, 0]


@pytest.mark.parametrize("v", [100, 256, 1000, 4096 + 7])
def test_entries_at_least_matches_nonzero(v):
    """The blocked candidate search finds exactly (s >= thr).nonzero(), tail block and ties included."""
    g = torch.Generator().manual_seed(v)
    s = torch.randn(5, v, generator=g).round(decimals=1)  # many exact ties
    s[4] = 0.0
    thr = torch.tensor([1.5, 0.0, -10.0, 3.0, 0.0])
    maxima = block_maxima(s)
    torch.testing.assert_close(maxima.amax(dim=1), s.amax(dim=1))
    rows, ids = entries_at_least(s, maxima, thr)
    want_rows, want_ids = (s >= thr.unsqueeze(1)).nonzero().unbind(1)
    assert torch.equal(rows, want_rows) and torch.equal(ids, want_ids)


def test_logits_match_reference():
    w = random_head()
    h = torch.randn(5, D) * 3
    torch.testing.assert_close(LMHead(w).logits(h), h @ w.T, atol=1e-5, rtol=1e-6)
    capped = LMHead(w, softcap=2.0).logits(h)
    torch.testing.assert_close(capped, 2.0 * torch.tanh((h @ w.T) / 2.0), atol=1e-5, rtol=1e-6)
    assert capped.abs().max() <= 2.0 and capped.is_contiguous()


def test_rows_match_logits():
    w = random_head()
    head = LMHead(w, softcap=5.0)
    h = torch.randn(3, D) * 3
    ids = torch.randint(V, (3, 7))
    full = head.logits(h)
    torch.testing.assert_close(head.rows(h, ids), full.gather(1, ids), atol=1e-5, rtol=1e-6)
    shared = torch.tensor([0, 17, V - 1])
    torch.testing.assert_close(head.rows(h, shared), full[:, shared], atol=1e-5, rtol=1e-6)


@needs_fbgemm
@pytest.mark.parametrize("t", [1, 4, 16])
def test_argmax_random_goes_through_screen(t):
    w = random_head()
    head = LMHead(w)
    for seed in range(5):
        h = torch.randn(t, D, generator=torch.Generator().manual_seed(seed)) * 3
        assert torch.equal(head.argmax(h), head.logits(h).argmax(-1))
    assert head.stats.screened == 5 * t and head.stats.exact == 0 and head.stats.fallbacks == 0


@needs_fbgemm
@pytest.mark.parametrize("t", [1, 4, 16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_argmax_exact_on_near_ties(t, softcap):
    w, anchors = near_tie_head()
    head = LMHead(w, softcap=softcap)
    for start in range(0, len(anchors), t):
        h = planted_states(w, anchors[start:start + t])
        assert torch.equal(head.argmax(h), head.logits(h).argmax(-1))
    if t == 1:  # one row per batch: both rescoring and the fallback on fp32-level ties are taken
        assert head.stats.rescored > 0 and head.stats.fallbacks > 0


@needs_fbgemm
def test_rescoring_decides_fp16_level_twins_without_fallback():
    """Twins 2e-4 apart (below fp16 resolution, far above fp32 noise): rescoring alone decides, either way round."""
    w = random_head()
    anchors = torch.arange(0, 4000, 100)
    for i, a in enumerate(anchors):
        w[a + 1] = w[a] * (1 + (2e-4 if i % 2 else -2e-4))
    head = LMHead(w)
    h = planted_states(w, anchors)
    assert torch.equal(head.argmax(h), head.logits(h).argmax(-1))
    assert head.stats.rescored == len(anchors) and head.stats.fallbacks == 0


@needs_fbgemm
def test_all_equal_winning_rows_give_lowest_id():
    w = random_head()
    block = torch.tensor([7000, 123, 15000, 4242])
    w[block] = w[555].clone()
    head = LMHead(w)
    h = planted_states(w, torch.tensor([555, 555, 555]))
    assert head.argmax(h).tolist() == [123, 123, 123] == head.logits(h).argmax(-1).tolist()


@needs_fbgemm
@pytest.mark.parametrize("softcap", [5.0, 0.05])
def test_saturating_softcap_ties_go_to_lowest_id(softcap):
    """Near saturation the fp32 cap maps different logits to one value (lowest id wins); argmax must follow the
    capped logits. Cap 5 merges twins about 1e-3 apart, cap 0.05 merges everything near the top."""
    w, anchors = near_tie_head()
    head = LMHead(w, softcap=softcap)
    h = planted_states(w, anchors)
    want = head.logits(h).argmax(-1)
    assert torch.equal(torch.cat([head.argmax(row[None]) for row in h]), want)
    assert torch.equal(head.argmax(h[:4]), want[:4])
    assert not torch.equal(want, LMHead(w).logits(h).argmax(-1))  # the cap really changed the answer


@needs_fbgemm
def test_too_small_bound_is_caught():
    """The oracle bites: with the error bound forced to 0 the screen misses fp16-reordered twins."""
    w, anchors = near_tie_head()
    head = LMHead(w)
    head.prepare()
    head.screen = Fp16Screen(head.screen.packed, slope=0.0)
    h = planted_states(w, anchors)
    wrong = sum(int(head.argmax(row[None]) != head.logits(row[None]).argmax(-1)) for row in h)
    assert wrong > 0


@needs_fbgemm
def test_screen_error_within_bound_for_wide_range_weights():
    """|screen - fp32 logits| <= slope * |h| for rows of very different scale, fp16 subnormals and saturation."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8192, D, generator=g) * torch.exp(2 * torch.randn(8192, 1, generator=g))
    w[0, :4] = torch.tensor([1e-7, 3e-8, 7e4, -1e5])
    head = LMHead(w)
    head.prepare()
    h = torch.randn(16, D, generator=g) * 10
    err = (head.screen(h).double() - (h.double() @ w.double().T)).abs()
    assert bool((err <= head.screen.slope * h.double().norm(dim=1, keepdim=True)).all())


@needs_fbgemm
def test_fp16_rounding_model_matches_fbgemm_packing():
    """screen_slope rounds weights like fbgemm does (saturate to +-65504, round to nearest even)."""
    w = torch.tensor([[1e-8, 6e-8, 3e-5, 7e4, -1e5, 65504.0, 65520.0, 0.1 + 2 ** -30]] * 2)
    packed = torch.ops.quantized.linear_prepack_fp16(w, None)
    unpacked = torch.ops.quantized.linear_unpack_fp16(packed)[0]
    assert torch.equal(unpacked, w.clamp(-65504, 65504).half().float())


def test_small_vocab_takes_exact_path():
    w = random_head(v=MIN_SCREEN_VOCAB // 2)
    head = LMHead(w)
    h = torch.randn(4, D)
    assert torch.equal(head.argmax(h), head.logits(h).argmax(-1))
    assert not head.prepare() and head.stats.exact == 4 and head.bytes_per_step() == w.numel() * 4


@needs_fbgemm
def test_non_finite_weights_disable_screen_and_nan_states_fall_back():
    for bad in (float("inf"), float("nan")):
        w = random_head()
        w[V - 3, 0] = bad
        assert not LMHead(w).prepare()
    head = LMHead(random_head())
    h = torch.randn(2, D)
    h[1, 5] = float("nan")
    assert torch.equal(head.argmax(h), head.logits(h).argmax(-1))
    assert head.stats.fallbacks == 1 and head.bytes_per_step() == V * D * 2


def test_empty_batch():
    assert LMHead(random_head()).argmax(torch.zeros(0, D)).shape == (0,)
