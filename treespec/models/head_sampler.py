"""Exact sampling from softmax(logits / T) through the LM head's fp16 screen, by Gumbel-max.

Why: sampling the usual way needs every fp32 logit of the head (Gemma 3 270M: 262k rows, 671 MB read per step,
then a softmax and a cumulative sum), while greedy decoding reads only the fp16 screen (lm_head.py). Gumbel-max
turns a draw into an argmax:
    y = argmax_v (x_v / T + g_v),   g_v = -log(-log u_v),   u_v i.i.d. uniform on (0, 1)
is an exact draw from softmax(x / T). Here x_v = cap(w_v . h) is the exact logit (rescored in float64, the
softcap applied exactly). The screen s_v obeys |s_v - w_v . h| <= E (lm_head.py's bound), so a token can only
win if
    cap(s_v + E) / T + g_v >= L,   L = x_j / T + g_j for any token j (here: the best-looking one).
g is increasing in u, so block maxima of s and of u rule out whole blocks of tokens at once; the survivors are
rescored in float64. Small vocabularies compute every x_v in float64 (the same draw for the same u); a row with
too many survivors falls back to the fp32 logits.

The uniforms of output position k come from the request's seed and k alone (treespec.noise), so a seeded
request draws the same token at a position whether the row came from plain decoding or from a tree node: with
one-hot drafts (n-gram, top-k) speculative sampling emits exactly what plain sampling emits.
"""
from __future__ import annotations

import torch

from treespec.models.lm_head import _BLOCK, MAX_RESCORE, LMHead, block_maxima, capped
from treespec.noise import PositionNoise, gumbel

def exact_logits(head: LMHead, h: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:  # h: [D]
    """cap(w_v . h) in float64 for the ids given (default: all): the logits the draws are exact about."""
    w = head.weight if ids is None else head.weight[ids]
    return capped(w.double() @ h.double(), head.softcap)


def gumbel_sample(head: LMHead, h: torch.Tensor, u: torch.Tensor, temperature: float,
                  screen: torch.Tensor | None = None) -> int:  # h: [D], u: [V] float64, screen: [V] fp32
    """argmax_v (x_v / T + g(u_v)): a draw from softmax(x / T), reading the fp16 screen row when given."""
    if screen is None:
        if head.vocab_size > 4 * MAX_RESCORE:  # no screen for a big head: the fp32 logits, not a float64 copy
            x = head.logits(h[None])[0].double()
        else:
            x = exact_logits(head, h)
        return int((x / temperature + gumbel(u)).argmax())
    return _screened_sample(head, h, u, temperature, screen)


def _screened_sample(head: LMHead, h: torch.Tensor, u: torch.Tensor, t: float, s: torch.Tensor) -> int:
    v = s.shape[0]
    err = float(head.screen.error(h[None])[0])
    ub = capped(block_maxima(s[None])[0].double() + err, head.softcap) / t + gumbel(block_maxima(u[None])[0])
    # L: the exact score of the best-looking token of the most promising block (any token gives a valid bound)
    first = _block_ids(torch.tensor([int(ub.argmax())]), v)
    j = first[int((s[first].double() / t + gumbel(u[first])).argmax())]
    low = float(exact_logits(head, h, j[None])[0]) / t + float(gumbel(u[j]))
    low -= 1e-12 * (abs(low) + 1.0)  # float64 rounding of the scores compared below
    ids = _block_ids((ub >= low).nonzero()[:, 0], v)
    cand = ids[capped(s[ids].double() + err, head.softcap) / t + gumbel(u[ids]) >= low]
    if not 0 < cand.numel() <= MAX_RESCORE:  # empty only if the bound were wrong; j always qualifies
        head.stats.fallbacks += 1
        return gumbel_sample(head, h, u, t)
    head.stats.screened += 1
    head.stats.candidates += cand.numel()
    scores = exact_logits(head, h, cand) / t + gumbel(u[cand])
    return int(cand[int(scores.argmax())])


def _block_ids(blocks: torch.Tensor, v: int) -> torch.Tensor:  # blocks: [B] -> token ids [<= B * _BLOCK]
    ids = (blocks.unsqueeze(1) * _BLOCK + torch.arange(_BLOCK)).flatten()
    return ids[ids < v]


def gumbel_draws(head: LMHead, hidden: torch.Tensor, u: torch.Tensor,
                 temperature: float) -> torch.Tensor:  # hidden: [n, D], u: [n, V] float64 -> [n] long
    """Every row's draw argmax_v (x_v / T + g(u_v)) at once (the portable head: no screen, one batched product),
    x as gumbel_sample takes it without a screen."""
    if head.vocab_size > 4 * MAX_RESCORE:
        x = head.logits(hidden).double()
    else:
        x = capped(hidden.double() @ head.weight.double().t(), head.softcap)
    return (x / temperature + gumbel(u)).argmax(dim=-1)


class NodeSampler:
    """The target's draw at each node of one request's tree (called along the walk, so only visited nodes pay).
    With a portable head every node is drawn up front in one batched argmax, and reaches the host once."""

    def __init__(self, head: LMHead, hidden: torch.Tensor, depth: torch.Tensor, noise: PositionNoise,
                 temperature: float, screen: torch.Tensor | None) -> None:  # hidden: [n, D], screen: [n, V]
        self.head, self.hidden, self.depth, self.noise = head, hidden, depth.tolist(), noise
        self.temperature, self.screen = temperature, screen
        self.draws: list[int] | None = None
        if head.portable:
            u = torch.stack([noise.gumbel_uniforms(d) for d in self.depth])
            self.draws = gumbel_draws(head, hidden, u, temperature).tolist()

    def __call__(self, node: int) -> int:
        if self.draws is not None:
            return self.draws[node]
        s = None if self.screen is None else self.screen[node]
        u = self.noise.gumbel_uniforms(self.depth[node])
        return gumbel_sample(self.head, self.hidden[node], u, self.temperature, s)
