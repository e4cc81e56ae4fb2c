"""The Q8_0 head kernel (kernels/q8_head.py) against its twin: dequantize + fp32 product + argmax; ties, near-ties,
the softcap, per-row and per-thread independence, and the path without a compiler."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from test_quant_blocks import random_blocks, reference
from treespec.kernels import q8_head
from treespec.kernels.block_layout import PackedBlocks, dequantize_packed, pack
from treespec.kernels.q8_head import Q8Head, reference_logits
from treespec.models.lm_head import LMHead, capped

ROWS = (1, 2, 3, 4, 5, 12, 13, 17, 64)
needs_kernel = pytest.mark.skipif(q8_head.compiled() is None, reason="head kernel cannot be built here")


def random_head(vocab: int, dim: int = 96, seed: int = 0, softcap: float | None = None) -> tuple[Q8Head, object]:
    raw = random_blocks(Q.Q8_0, vocab, dim, seed=seed)
    return Q8Head(pack(raw, Q.Q8_0, (vocab, dim)), softcap), raw


def mm_argmax(head: Q8Head, h: torch.Tensor) -> torch.Tensor:  # the twin: [T]
    return capped(reference_logits(h, head.blocks), head.softcap).argmax(-1)


@needs_kernel
@pytest.mark.parametrize("vocab", (1, 3, 13, 1001, 4099))
def test_logits_topk_and_argmax_match_the_reference(vocab: int) -> None:
    head, raw = random_head(vocab, seed=vocab)
    torch.manual_seed(vocab)
    for rows in ROWS:
        h = torch.randn(rows, 96)
        logits = head.logits(h)
        exact, bound = reference(raw, Q.Q8_0, (vocab, 96), h)
        assert ((logits.double() - exact).abs() <= bound).all(), f"rows={rows}"
        k = min(8, vocab)
        vals, ids = head.topk(h)
        order = logits.sort(dim=1, descending=True, stable=True)
        assert torch.equal(vals[:, :k], order.values[:, :k]) and torch.equal(ids[:, :k], order.indices[:, :k])
        choice = head.argmax(h)
        assert torch.equal(choice.ids, logits.argmax(-1)) and torch.equal(choice.top, logits.amax(-1))
        assert choice.certain.all()  # random logits: no near-ties
        assert torch.equal(choice.ids, mm_argmax(head, h))


@needs_kernel
def test_ties_pick_the_lowest_id_and_near_ties_are_left_uncertain() -> None:
    """Row 40 outweighs the others (scales 0.5 vs ~0.01); rows 5, 700 and 2100 are copies of it (exact ties); row 41
    is a copy with one code one step higher in a block whose scale is 2^-20 (a gap far below fp32 noise)."""
    head, _ = random_head(2500, seed=3)
    q, d = head.q.clone(), head.d.clone()
    d[40] = 0.5
    d[40, 1] = 2.0 ** -20
    for copy in (5, 700, 2100, 41):
        q[copy], d[copy] = q[40], d[40]
    q[41, 32] = q[41, 32] + (1 if q[41, 32] < 127 else -1)
    tied = Q8Head(PackedBlocks(q, d.float(), None, 32))
    w = dequantize_packed(tied.blocks)
    h = torch.stack([w[40] * 50.0, w[41] * 50.0, torch.randn(96)])        # rows 0-1 pick the tied tokens
    choice = tied.argmax(h)
    logits = tied.logits(h)
    assert torch.equal(choice.ids, logits.argmax(-1))
    assert choice.ids[0] == 5                                              # the lowest of the exact copies
    assert not choice.certain[0] and not choice.certain[1] and choice.certain[2]
    assert choice.ids[2] == mm_argmax(tied, h)[2]


@needs_kernel
def test_certain_rows_agree_with_every_fp32_product() -> None:
    """Planted states with near-ties between two tokens: where the head says certain, torch's mm and LMHead's
    fp16-screened path choose the same token."""
    head, _ = random_head(5000, seed=7)
    w = dequantize_packed(head.blocks)
    torch.manual_seed(0)
    pairs = torch.randint(0, 5000, (64, 2))
    mix = torch.rand(64, 1) * 1e-3 + 0.5                                   # halfway between two tokens, nearly
    h = 40.0 * (mix * w[pairs[:, 0]] + (1 - mix) * w[pairs[:, 1]]) + 0.01 * torch.randn(64, 96)
    choice = head.argmax(h)
    lm = LMHead(w)
    sure = choice.certain
    assert sure.sum() > 32
    assert torch.equal(choice.ids[sure], mm_argmax(head, h)[sure])
    assert torch.equal(choice.ids[sure], lm.argmax(h)[sure])


@needs_kernel
def test_softcap_ties_beyond_the_kept_logits() -> None:
    """A tiny cap saturates tanh, merging many logits into the same fp32 value: the lowest id among them wins,
    also when more of them tie than the kernel keeps per row."""
    head, _ = random_head(3000, seed=11, softcap=0.05)
    h = 30.0 * torch.randn(6, 96)
    choice = head.argmax(h)
    logits = head.logits(h)
    assert (logits == logits.amax(-1, keepdim=True)).sum(-1).max() > q8_head.TOP_K  # the full-logits path ran
    assert torch.equal(choice.ids, logits.argmax(-1)) and torch.equal(choice.top, logits.amax(-1))
    capped_head = random_head(3000, seed=11, softcap=30.0)[0]
    sure = capped_head.argmax(h / 30.0)                                    # logits well inside the cap
    assert sure.certain.all()
    assert torch.equal(sure.ids, mm_argmax(capped_head, h / 30.0))


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    head, _ = random_head(777, dim=640, seed=5)
    h = torch.randn(64, 640)
    logits, (vals, ids) = head.logits(h), head.topk(h)
    for t in (0, 1, 17, 63):
        assert torch.equal(head.logits(h[t:t + 1])[0], logits[t])
        one_vals, one_ids = head.topk(h[t:t + 1])
        assert torch.equal(one_vals[0], vals[t]) and torch.equal(one_ids[0], ids[t])
    for lo, hi in ((0, 3), (5, 22), (7, 64)):
        assert torch.equal(head.logits(h[lo:hi]), logits[lo:hi])
        assert torch.equal(head.topk(h[lo:hi])[1], ids[lo:hi])


@needs_kernel
def test_thread_count_does_not_change_the_result() -> None:
    head, _ = random_head(4099, seed=2)
    h = torch.randn(7, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = head.logits(h), head.topk(h)
        torch.set_num_threads(2)
        assert torch.equal(head.logits(h), alone[0]) and torch.equal(head.topk(h)[1], alone[1][1])
    finally:
        torch.set_num_threads(threads)


def test_without_the_kernel_the_reference_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    head, _ = random_head(301, seed=4)
    h = torch.randn(5, 96)
    monkeypatch.setattr(q8_head, "compiled", lambda: None)
    assert torch.equal(head.logits(h), reference_logits(h, head.blocks))
    assert torch.equal(head.argmax(h).ids, mm_argmax(head, h))


def test_only_q8_0_blocks_are_accepted() -> None:
    raw = random_blocks(Q.Q4_K, 4, 256)
    with pytest.raises(ValueError, match="Q8_0"):
        Q8Head(pack(raw, Q.Q4_K, (4, 256)))


@needs_kernel
def test_lm_head_argmax_through_the_blocks_equals_its_exact_argmax() -> None:
    """LMHead with the Q8_0 blocks attached: rows of 1-3 go through them, certain rows are kept, near-ties (row 41
    = row 40 but one code in a block of scale 2^-20) go to LMHead's own path; every answer is LMHead.logits'
    argmax. 4 rows take the screen's path; other weights are refused."""
    head, _ = random_head(5000, seed=7)
    q, d = head.q.clone(), head.d.clone()
    d[40] = 0.5
    d[40, 1] = 2.0 ** -20
    q[41], d[41] = q[40], d[40]
    q[41, 32] = q[41, 32] + (1 if q[41, 32] < 127 else -1)
    head = Q8Head(PackedBlocks(q, d.float(), None, 32))
    w = dequantize_packed(head.blocks)
    torch.manual_seed(1)
    h = torch.randn(24, 96)
    h[::2] = 10.0 * w[40] + 1e-3 * torch.randn(12, 96)                     # every other row: a near-tie
    lm = LMHead(w)
    lm.use_blocks_head(head)
    for rows in (1, 3):
        for part in h.split(rows):
            assert torch.equal(lm.argmax(part), lm.logits(part).argmax(-1))
    assert 0 < lm.stats.blocks < 48 and lm.stats.screened + lm.stats.exact > 0
    before = lm.stats.blocks
    lm.argmax(h[:4])
    assert lm.stats.blocks == before
    other = w.clone()
    other[0, 0] += 1.0
    with pytest.raises(ValueError, match="does not hold"):
        LMHead(other).use_blocks_head(head)
