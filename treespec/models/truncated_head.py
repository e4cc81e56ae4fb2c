"""A draft head over the N most frequent tokens only, so a 262k-row output layer does not dominate draft cost.

The draft's q is zero outside the subset (logits -inf there); verification scores the full vocabulary with the
target, and the acceptance rules never accept a token q did not propose, so outputs stay exactly the target's.
Frequencies come from the target's own text: every prompt and committed output the drafter sees is counted, on
top of an optional token-count file. Until a token has been counted, lower ids rank first (BPE/SentencePiece
vocabularies list their frequent pieces early).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from treespec.errors import ConfigError
from treespec.models.lm_head import LMHead, capped, fp16_ops_available
from treespec.models.matmul import few_rows_linear

REFRESH_TOKENS = 2048  # newly counted tokens before the subset (and the head slice) is recomputed
# Coupled drafting adds, per output position, the tokens outside the subset whose Gumbel noise is among the
# ~NOISE_TAIL highest of the whole vocabulary (see noise_tail). Measured on the T = 1 outputs of 60 Spec-Bench
# prompts (Gemma 3 270M, 32k-token subset): target tokens outside the draft vocabulary 10.4% -> 2.7% (1024: 3.3%,
# 4096: 2.2%) for ~1.8k extra head rows per drafted node.
NOISE_TAIL = 2048


def load_token_counts(path: str, vocab_size: int) -> torch.Tensor:  # -> [vocab_size] float64
    """Counts from JSON: a list (index = token id) or an object {"id": count}; errors name draft_vocab_counts."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"draft_vocab_counts: cannot read token counts from {path!r}: {e}") from None
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    items = enumerate(raw) if isinstance(raw, list) else raw.items() if isinstance(raw, dict) else None
    if items is None:
        raise ConfigError("draft_vocab_counts: expected a JSON list of counts or an object {token id: count}")
    for key, value in items:
        try:
            tok, n = int(key), float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"draft_vocab_counts: bad entry {key!r}: {value!r}") from None
        if not 0 <= tok < vocab_size or n < 0:
            raise ConfigError(f"draft_vocab_counts: token {tok} (count {n}) is outside the vocabulary or negative")
        counts[tok] += n
    return counts


def save_token_counts(path: Path, token_ids: torch.Tensor, vocab_size: int) -> int:
    """Write the counts of token_ids as load_token_counts reads them ({"id": count}, counted ids only); returns
    how many distinct ids were written."""
    counts = torch.bincount(token_ids.long().flatten(), minlength=vocab_size)[:vocab_size]
    ids = counts.nonzero().flatten().tolist()
    Path(path).write_text(json.dumps({str(i): int(counts[i]) for i in ids}, separators=(",", ":")) + "\n")
    return len(ids)


class VocabSubset:
    """Token frequencies and the `size` most frequent ids (ties: lower id first)."""

    def __init__(self, vocab_size: int, size: int, counts: torch.Tensor | None = None) -> None:
        self.vocab_size, self.size = vocab_size, min(size, vocab_size)
        self.counts = torch.zeros(vocab_size, dtype=torch.float64) if counts is None else counts.double().clone()
        self._fresh = 0  # tokens counted since ids() was last recomputed
        self._ids: torch.Tensor | None = None

    @classmethod
    def fixed(cls, vocab_size: int, ids: torch.Tensor) -> "VocabSubset":
        """A subset that is exactly `ids` (a trained drafter's vocabulary); counting more never changes it."""
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        counts[ids] = float(2 ** 52)  # beyond anything counted in one process: the top `size` stay these ids
        return cls(vocab_size, int(ids.numel()), counts)

    def count(self, token_ids: list[int]) -> None:
        ids = torch.tensor([t for t in token_ids if 0 <= t < self.vocab_size], dtype=torch.long)
        if ids.numel():
            self.counts.index_add_(0, ids, torch.ones(ids.numel(), dtype=torch.float64))
            self._fresh += ids.numel()

    def stale(self) -> bool:
        return self._ids is None or self._fresh >= REFRESH_TOKENS

    def ids(self) -> torch.Tensor:  # -> [size] long, ascending
        """The subset, recomputed when REFRESH_TOKENS new tokens have been counted since the last call."""
        if self.stale():
            # counts are integers: the id term (< 1) only breaks ties, toward lower ids
            rank = self.counts - torch.arange(self.vocab_size, dtype=torch.float64) / self.vocab_size
            self._ids = torch.topk(rank, self.size).indices.sort().values
            self._fresh = 0
        return self._ids


def noise_tail(u: torch.Tensor, in_subset: torch.Tensor, expected: int) -> torch.Tensor:
    """Ids outside the subset whose uniform u_v (hence Gumbel noise g(u_v)) is above 1 - expected / V: about
    `expected` * (1 - N / V) of them, ascending.  u: [V] float64, in_subset: [V] bool -> [m] long.

    Why: at temperature T the target draws argmax_v (x_v / T + g_v). A token outside the draft vocabulary wins
    mostly when its probability is small (that is why it is outside), and then only with large noise:
    g_v = M - x_v / T for the winner, M - log Z ~ Gumbel(0, 1), so the winner's noise is about -log p_v. The
    noise is known before the draft runs, so these few rows catch most of those winners."""
    ids = (u > 1.0 - expected / u.shape[0]).nonzero()[:, 0]
    return ids[~in_subset[ids]]


class TruncatedHead:
    """Draft logits [T, V] from the target's head restricted to a VocabSubset: -inf outside it.

    The slice of the head is kept in fp16 (fbgemm's fp16-weight GEMM, half the bytes) when available, else fp32;
    the draft need not be exact, only the target is.
    """

    def __init__(self, head: LMHead, subset: VocabSubset, fp16: bool = True) -> None:
        self.head, self.subset, self.fp16 = head, subset, fp16 and fp16_ops_available()
        self._ids: torch.Tensor | None = None
        self._weight: torch.Tensor | torch.ScriptObject | None = None
        self._mask: torch.Tensor | None = None  # [V] bool: in the current subset (coupled drafting's noise tail)

    def ids(self) -> torch.Tensor:  # -> [N] long
        """The current subset; the head slice follows it."""
        ids = self.subset.ids()
        if ids is not self._ids:
            w = self.head.weight[ids].contiguous()
            self._weight = torch.ops.quantized.linear_prepack_fp16(w, None) if self.fp16 else w
            self._mask = torch.zeros(self.head.vocab_size, dtype=torch.bool)
            self._mask[ids] = True
            self._ids = ids
        return ids

    def noise_tail_logits(self, hidden: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise tail of uniforms u: [V] (see noise_tail) and the full head's logits of those ids for one
        hidden state [D] (fp32 rows, softcapped like subset_logits): ids [m], logits [m]."""
        self.ids()
        n = min(u.shape[0], self.head.vocab_size)  # the noise covers the target's vocabulary, the head its rows
        ids = noise_tail(u[:n], self._mask[:n], NOISE_TAIL)
        return ids, self.head.rows(hidden[None], ids)[0]

    def bytes_per_forward(self) -> int:
        """Weight bytes one draft head forward reads."""
        return self.subset.size * self.head.weight.shape[1] * (2 if self.fp16 else 4)

    def subset_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [T, D] -> [T, N] fp32
        self.ids()
        if self.fp16:
            z = torch.ops.quantized.linear_dynamic_fp16(hidden.contiguous(), self._weight)
        else:
            z = few_rows_linear(self._weight, hidden)
        return capped(z, self.head.softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [T, D] -> [T, V] fp32
        """Subset logits scattered into full-vocabulary rows (draft ids mapped back to target ids)."""
        z = self.subset_logits(hidden)
        out = z.new_full((hidden.shape[0], self.head.vocab_size), float("-inf"))
        out[:, self._ids] = z
        return out
