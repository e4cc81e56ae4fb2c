"""The training form of models/draft_net.DraftNet, with EAGLE-3-style unrolled training.

The decoder blocks are the runtime's own (`draft_blocks`: the target families' Llama block) with autograd on;
only their K/V store differs (`PassCache`), so training and drafting cannot drift apart.

Pass 0 reads the target's true features (a head) and is the draft's first level; pass j feeds pass j-1's output
hidden at row t-1 as the feature of row t: the draft j levels below a committed root. Its attention sees exactly
what the runtime tree node sees: the true-feature rows up to its root (pass 0, rows <= t-j) and its own chain
(pass i, row t-j+i). Every pass is scored against the target's distribution of the same next token, so the
draft learns to keep going on its own guesses (the runtime's deeper levels) instead of only on true features.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from treespec.attention.metadata import SeqAttention
from treespec.models.draft_net import DraftNetConfig, block_tensor_shapes, draft_blocks
from treespec.models.layers import ForwardBatch, RotaryTable, rms_norm
from treespec.models.lm_head import capped

_STEM = ("fc", "embed_norm", "feature_norm", "norm")  # the tensors around the blocks, named "<name>.weight"


class PassCache:
    """One sequence's K/V over the unrolled passes, shown to the blocks' `Attention` as a KVCache shows a tree
    grown level by level: each pass's n rows are pending slots after the earlier passes' (and no committed slots).
    Each write is kept as its own tensor, as autograd cannot differentiate through a cache written in place."""

    def __init__(self, num_layers: int) -> None:
        self.length, self.pending = 0, 0
        self._k: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._v: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]

    def reserve(self, n: int) -> None:
        self.pending += n

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k_new, v_new: [KV, n, hd] -> every pass's k, v so far: [KV, pending, hd]."""
        self._k[layer].append(k_new)
        self._v[layer].append(v_new)
        return torch.cat(self._k[layer], dim=1), torch.cat(self._v[layer], dim=1)


class TrainDraftNet(torch.nn.Module):
    """A drafter being trained: `tensors()` are its weights under the drafter file's names."""

    def __init__(self, cfg: DraftNetConfig, embed: torch.Tensor, embed_scale: float | None,
                 head_rows: torch.Tensor, generator: torch.Generator | None = None,
                 softcap: float | None = None) -> None:
        """embed: [V, D] the target's input embedding; head_rows: [N, D] its output rows of the draft vocab;
        softcap: the target head's final logit softcap (the runtime's truncated head applies it too)."""
        super().__init__()
        self.cfg, self.softcap = cfg, softcap
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("head_rows", head_rows, persistent=False)
        self.embed_scale = embed_scale
        init = _initial_tensors(cfg, generator)
        for name in _STEM:
            setattr(self, name, torch.nn.Parameter(init[f"{name}.weight"]) if f"{name}.weight" in init else None)
        self.layers = draft_blocks(cfg, init)
        self.layers.requires_grad_(True)
        self.rope = RotaryTable(cfg.model_config().rope, cfg.head_dim)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors under their file names."""
        out = {f"{name}.weight": p.detach() for name in _STEM if (p := getattr(self, name)) is not None}
        for n, block in enumerate(self.layers):
            out |= {f"layers.{n}.{k}": t for k, t in block.hf_tensors().items()}
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the values of a drafter file's tensors (the parameters stay the same objects)."""
        blocks = draft_blocks(self.cfg, tensors)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(tensors[f"{name}.weight"] if name in _STEM
                        else blocks.get_parameter(name.removeprefix("layers.")))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [..., D] -> [..., N] over the draft vocab
        return capped(hidden @ self.head_rows.T, self.softcap)

    def unrolled(self, tokens: torch.Tensor, features: torch.Tensor | None, passes: int) -> list[torch.Tensor]:
        """Output hidden states of each pass, [B, L, D] each.

        tokens: [B, L] the pair tokens x_{t+1}; features: [B, L, D] the target's h_t (None for an ssm).
        Rows t < j of pass j have no root in the sequence and must not be scored.
        """
        b, n = tokens.shape
        eps = self.cfg.rms_norm_eps
        emb = F.embedding(tokens.reshape(-1), self.embed)            # [B L, D], sequence i at rows i L ..
        if self.embed_scale is not None:
            emb = emb * self.embed_scale
        emb = rms_norm(emb, self.embed_norm, eps)
        positions = torch.arange(n)
        rope = dict.fromkeys((False, True), self.rope.lookup(positions))
        caches = [PassCache(self.cfg.num_layers) for _ in range(b)]
        outs: list[torch.Tensor] = []
        feat = None if features is None else features.reshape(b * n, -1)
        for j in range(passes if self.cfg.features else 1):
            mask = _unroll_mask(n, j)
            x = torch.cat([rms_norm(feat, self.feature_norm, eps), emb], dim=-1) if self.cfg.features else emb
            hidden = []
            # the blocks take one sequence at a time: a flat batch of B would make autograd zero-fill and sum
            # B full-batch gradients for the per-request slices in Attention
            for cache, h in zip(caches, F.linear(x, self.fc).split(n)):
                cache.reserve(n)
                batch = ForwardBatch([SeqAttention(cache, 0, n, mask)], positions, rope)
                for block in self.layers:
                    h = block(h, batch)
                hidden.append(h)
            out = rms_norm(torch.cat(hidden), self.norm, eps).view(b, n, -1)
            outs.append(out)
            # row t of the next pass reads this pass's guess at row t-1 (row 0 gets a placeholder, never scored)
            feat = torch.cat([out[:, :1], out[:, :-1]], dim=1).reshape(b * n, -1)
        return outs


def _initial_tensors(cfg: DraftNetConfig, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Norms at 1, matrices ~ N(0, 1/fan_in), residual outputs scaled down by sqrt(2 layers)."""
    out = {}
    for name, shape in block_tensor_shapes(cfg).items():
        if len(shape) == 1:
            w = torch.ones(shape)
        else:
            w = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                w /= math.sqrt(2 * cfg.num_layers)
        out[name] = w
    return out


def _unroll_mask(n: int, j: int) -> torch.Tensor:
    """[n, (j+1) n] bool: pass j's row t sees pass 0's rows <= t-j and pass i's row t-j+i (i = 1..j)."""
    t = torch.arange(n)
    parts = [t[None, :] <= (t[:, None] - j)]
    for i in range(1, j + 1):
        parts.append(t[None, :] == (t[:, None] - j + i))
    return torch.cat(parts, dim=1)  # rows t < j (no root in the sequence) still see themselves
