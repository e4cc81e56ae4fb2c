"""The AVX512_BF16 screen over a Q8_0 head (kernels/bf16_screen.py): its values against a float64 twin, its fused
top-k against a sort of them, its error bound against exact products, and LMHead's argmax through it against the
dequantized fp32 argmax (random heads, constructed ties and near-ties, outlier channels, non-finite states), then
end to end in blocks mode."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from test_quant_blocks import random_blocks
from tiny_gguf import write_model
from treespec import LLM, SamplingParams
from treespec.kernels import bf16_screen
from treespec.kernels.bf16_screen import Bf16Screen, reference_screen
from treespec.kernels.block_layout import PackedBlocks, dequantize_packed, pack
from treespec.kernels.q8_head import Q8Head
from treespec.models.lm_head import LMHead, gamma

needs_bf16 = pytest.mark.skipif(bf16_screen.compiled() is None, reason="no AVX512_BF16 (or no compiler) here")
ROWS = (1, 2, 4, 5, 9, 17)


def random_head(vocab: int, dim: int, seed: int = 0) -> Q8Head:
    return Q8Head(pack(random_blocks(Q.Q8_0, vocab, dim, seed=seed), Q.Q8_0, (vocab, dim)))


def screened_head(q8: Q8Head) -> LMHead:
    """An LMHead over the dequantized weights whose argmax takes the bf16 screen for every row count."""
    lm = LMHead(dequantize_packed(q8.blocks))
    lm.use_blocks_head(q8, Bf16Screen.build(q8))
    lm.wide_screen_from_rows = 1
    return lm


def states(rows: int, dim: int, seed: int, outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = 30.0 * torch.randn(rows, dim, generator=g)
    if outliers:  # a few channels hundreds of times larger, as real hidden states have
        h[:, 3] *= 300.0
        h[:, dim // 2] *= -500.0
    return h


def test_no_screen_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the CPU lacks AVX512_BF16 there is no screen, and LMHead keeps its fp16 path (today's answers)."""
    monkeypatch.setattr(bf16_screen, "compiled", lambda: None)
    q8 = random_head(64, 64)
    assert Bf16Screen.build(q8) is None
    lm = LMHead(dequantize_packed(q8.blocks))
    lm.use_blocks_head(q8, None)
    assert lm.wide_screen is None


@needs_bf16
@pytest.mark.parametrize("vocab,dim", [(1001, 64), (4099, 640), (3, 640)])
def test_values_match_the_twin_and_topk_matches_their_sort(vocab: int, dim: int) -> None:
    q8 = random_head(vocab, dim, seed=vocab)
    screen = Bf16Screen(q8)
    k = min(8, vocab)
    for rows in ROWS:
        h = states(rows, dim, seed=rows, outliers=rows == 5)
        s = screen.logits(h)
        twin = reference_screen(h, q8)
        # the kernel sums exact bf16 products in fp32: within gamma_2D |w~| |h~| of the float64 twin
        slack = gamma(2 * dim) * screen.rounded_norm * h.bfloat16().double().norm(dim=1, keepdim=True)
        assert ((s.double() - twin).abs() <= slack).all()
        assert torch.equal(s[-1:], screen.logits(h[-1:]))  # a row's values do not depend on the other rows
        vals, ids = bf16_screen.compiled().bf16_topk(h.bfloat16(), q8.q, q8.d, k)
        order = s.sort(dim=1, descending=True, stable=True)  # lowest id first among equal values
        assert torch.equal(vals, order.values[:, :k]) and torch.equal(ids, order.indices[:, :k])


@needs_bf16
def test_values_do_not_depend_on_the_thread_count() -> None:
    q8 = random_head(3001, 640, seed=6)
    screen = Bf16Screen(q8)
    h = states(9, 640, seed=3)
    many = screen.logits(h), bf16_screen.compiled().bf16_topk(h.bfloat16(), q8.q, q8.d, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = screen.logits(h), bf16_screen.compiled().bf16_topk(h.bfloat16(), q8.q, q8.d, 8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many[0], one[0]) and all(torch.equal(a, b) for a, b in zip(many[1], one[1]))


@needs_bf16
def test_norms_are_the_rounded_weights_norms() -> None:
    q8 = random_head(2049, 640, seed=2)
    screen = Bf16Screen(q8)
    w = dequantize_packed(q8.blocks)
    wb = w.bfloat16().float()
    for got, want in ((screen.rounded_norm, wb), (screen.error_norm, w - wb), (screen.exact_norm, w)):
        worst = want.double().norm(dim=1).max().item()
        assert worst <= got <= worst * (1 + 1e-8)


@needs_bf16
@pytest.mark.parametrize("outliers", [False, True])
def test_the_bound_holds_against_fp32_and_exact_products(outliers: bool) -> None:
    q8 = random_head(4099, 640, seed=4)
    screen = Bf16Screen(q8)
    w = dequantize_packed(q8.blocks)
    h = states(33, 640, seed=9, outliers=outliers)
    s = screen.logits(h).double()
    bound = screen.error(h).unsqueeze(1)
    used = (s - h.double() @ w.double().t()).abs()
    assert (used <= bound).all() and (s - (h @ w.t()).double()).abs().le(bound).all()
    assert used.max() > 1e-3 * bound.max()  # the bound is not vacuous by orders of magnitude


@needs_bf16
@pytest.mark.parametrize("vocab,dim", [(1001, 64), (4099, 640)])
def test_argmax_is_the_dequantized_fp32_argmax(vocab: int, dim: int) -> None:
    q8 = random_head(vocab, dim, seed=vocab + 1)
    lm = screened_head(q8)
    for rows in ROWS:
        h = states(rows, dim, seed=100 + rows, outliers=rows == 17)
        assert torch.equal(lm.argmax(h), (h @ lm.weight.t()).argmax(-1))
    assert lm.stats.wide == lm.stats.screened == sum(ROWS) and lm.stats.exact == 0


@needs_bf16
def test_near_ties_are_rescored_and_exact_ties_fall_back() -> None:
    """Row 40 outweighs the others (scales 0.05 vs ~0.01); 700, 2100 and 41 are copies of it (41 with one code
    changed in a block scaled 2^-20: below fp32 noise), 42 with code 64 one step higher. With h along row 40
    (h[64] = 0) they tie (the screen leaves such rows uncertain, the exact logits decide); with h[64] raised, 42 wins by ~100, inside the screen's
    error (about a thousand here) but far outside fp32 noise: float64 rescoring decides."""
    q8 = random_head(2500, 640, seed=3)
    q, d = q8.q.clone(), q8.d.clone()
    d[40] = 0.05
    d[40, 1] = 2.0 ** -20
    q[40, 64] = 100
    for copy in (700, 2100, 41, 42):
        q[copy], d[copy] = q[40], d[40]
    q[41, 32] = q[41, 32] + (1 if q[41, 32] < 127 else -1)
    q[42, 64] = 101
    lm = screened_head(Q8Head(PackedBlocks(q, d.float(), None, 32)))
    w = lm.weight
    along = w[40] * 40.0
    along[64] = 0.0                                             # 42 ties with 40 too
    raised = along.clone()
    raised[64] = 2000.0
    for name, h in {"tie": along, "rescored": raised}.items():
        before = (lm.stats.rescored, lm.stats.exact)
        batch = torch.stack([h, states(1, 640, seed=1)[0], h, states(1, 640, seed=2)[0]])
        got = lm.argmax(batch)
        assert torch.equal(got, lm.logits(batch).argmax(-1)), name
        if name == "rescored":
            assert got[0] == 42 and lm.stats.rescored >= before[0] + 2 and lm.stats.exact == before[1]
        else:
            assert got[0] == 40 and lm.stats.exact == before[1] + 2


@needs_bf16
def test_non_finite_states_fall_back_to_the_exact_argmax() -> None:
    lm = screened_head(random_head(1001, 64, seed=8))
    h = states(4, 64, seed=1)
    h[1, 5] = float("nan")
    h[2, 7] = float("inf")
    assert torch.equal(lm.argmax(h), lm.logits(h).argmax(-1))


@pytest.fixture(scope="module")
def blocks_llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path: Path = tmp_path_factory.mktemp("bf16_screen") / "gemma3.gguf"
    write_model(path, "gemma3", qtypes=(Q.Q8_0, Q.Q5_0))  # token_embd comes first: Q8_0
    spec = {"method": "ngram", "prompt_lookup_min": 1, "prompt_lookup_max": 3, "num_speculative_tokens": 4,
            "budget": 6}
    return LLM(str(path), speculative_config=spec, weight_quantization="blocks")


@needs_bf16
def test_speculative_greedy_equals_plain_greedy_through_the_screen(blocks_llm: LLM) -> None:
    head = blocks_llm.target.lm_head
    assert isinstance(head.wide_screen, Bf16Screen) and head.blocks_head is not None
    prompts = ["hello world hello world hello", "the the the world", "abc abc abc ab", "x = (x)"]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    plain = [o.token_ids for o in blocks_llm.generate(prompts, params, speculate=False)]
    before = head.stats.wide
    assert [o.token_ids for o in blocks_llm.generate(prompts, params, speculate=True)] == plain
    assert head.stats.wide > before  # the batch's tree rows (16 or more) went through the bf16 screen
    alone = [blocks_llm.generate(p, params, speculate=False)[0].token_ids for p in prompts]
    assert alone == plain
