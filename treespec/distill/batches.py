"""Training pairs cut from the dataset: windows of consecutive rows, padded to one length.

Row t of sequence s (t = 0..n-2) pairs token x_{t+1} with feature h_t; its label is the target's distribution
of x_{t+2} (stored at position t+1) and its feature target is h_{t+1}. Row weights live per dataset position
(offsets[s] + t), so boost-tuning can zero rows that earlier drafters already get right.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec.distill.data import DistillData
from treespec.errors import ConfigError

HOLD_OUT = 0.05  # fraction of sequences held out for evaluation (at least one)


@dataclass(frozen=True)
class Window:
    seq: int
    start: int   # first row
    n: int       # rows (<= the batch's seq_len; the rest is padding)


@dataclass
class Batch:
    tokens: torch.Tensor         # [B, L] long, x_{t+1}
    features: torch.Tensor       # [B, L, D] fp32, h_t
    next_features: torch.Tensor  # [B, L, D] fp32, h_{t+1}
    label_ids: torch.Tensor      # [B, L, K] long, draft-vocab indices
    label_probs: torch.Tensor    # [B, L, K] fp32, renormalised over the top K
    weights: torch.Tensor        # [B, L] fp32, 0 on padding
    rows: torch.Tensor           # [B, L] long, dataset position of each row (offsets[s] + t)
    num_rows: int                # rows that are not padding


def split(data: DistillData, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) sequence ids: a seeded HOLD_OUT share held out, at least one."""
    if data.num_seqs < 2:
        raise ConfigError(f"the dataset has {data.num_seqs} sequence(s); training needs at least 2 (one is held out)")
    perm = torch.randperm(data.num_seqs, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(HOLD_OUT * data.num_seqs))
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def rows_of(data: DistillData, seqs: list[int]) -> torch.Tensor:  # -> [len(seqs)] long
    return data.lengths()[seqs] - 1


def sample_windows(data: DistillData, seqs: list[int], batch_size: int, seq_len: int,
                   gen: torch.Generator) -> list[Window]:
    """batch_size random windows: sequences drawn in proportion to their rows, starts uniform."""
    rows = rows_of(data, seqs)
    picks = torch.multinomial(rows.double(), batch_size, replacement=True, generator=gen)
    u = torch.rand(batch_size, generator=gen, dtype=torch.float64)
    out = []
    for i, x in zip(picks.tolist(), u.tolist()):
        n = int(rows[i])
        start = int(x * (max(0, n - seq_len) + 1))
        out.append(Window(seqs[i], start, min(seq_len, n)))
    return out


def tile_windows(data: DistillData, seqs: list[int], seq_len: int) -> list[Window]:
    """Every row of seqs once, in consecutive windows of at most seq_len rows."""
    rows = rows_of(data, seqs).tolist()
    return [Window(s, a, min(seq_len, n - a)) for s, n in zip(seqs, rows) for a in range(0, n, seq_len)]


def gather(data: DistillData, windows: list[Window], seq_len: int, row_weights: torch.Tensor | None = None) -> Batch:
    """The rows of windows, padded to seq_len; row_weights: [T] per dataset position (default all 1)."""
    ar = torch.arange(seq_len)
    starts = torch.tensor([int(data.offsets[w.seq]) + w.start for w in windows])
    lengths = torch.tensor([w.n for w in windows])
    rows = starts[:, None] + torch.minimum(ar[None, :], lengths[:, None] - 1)  # padding repeats the last row
    weights = (ar[None, :] < lengths[:, None]).float()
    if row_weights is not None:
        weights = weights * row_weights[rows]
    probs = data.label_probs[rows + 1].float()
    return Batch(tokens=data.tokens[rows + 1].long(), features=data.features[rows].float(),
                 next_features=data.features[rows + 1].float(), label_ids=data.label_ids[rows + 1].long(),
                 label_probs=probs / probs.sum(-1, keepdim=True), weights=weights, rows=rows,
                 num_rows=int(lengths.sum()))


def batched(windows: list[Window], batch_size: int) -> list[list[Window]]:
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
