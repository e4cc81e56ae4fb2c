"""The trainable twin of models/draft_net.DraftNet, with EAGLE-3-style unrolled training.

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

from treespec.models.draft_net import DraftNetConfig, block_tensor_shapes
from treespec.models.layers import RotaryTable, apply_rope
from treespec.models.lm_head import capped


class TrainDraftNet(torch.nn.Module):
    """Parameters named as block_tensor_shapes names them (dots -> the ParameterDict's '/' keys)."""

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
        self.params = torch.nn.ParameterDict()
        for name, shape in block_tensor_shapes(cfg).items():
            if len(shape) == 1:
                w = torch.ones(shape)
            else:
                w = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    w /= math.sqrt(2 * cfg.num_layers)
            self.params[name.replace(".", "/")] = torch.nn.Parameter(w)
        self.rope = RotaryTable(cfg.model_config().rope, cfg.head_dim)

    def p(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "/")]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors under their file names."""
        return {k.replace("/", "."): v.detach() for k, v in self.params.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in tensors.items():
                self.params[k.replace(".", "/")].copy_(v)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [..., D] -> [..., N] over the draft vocab
        return capped(hidden @ self.head_rows.T, self.softcap)

    def unrolled(self, tokens: torch.Tensor, features: torch.Tensor | None, passes: int) -> list[torch.Tensor]:
        """Output hidden states of each pass, [B, L, D] each.

        tokens: [B, L] the pair tokens x_{t+1}; features: [B, L, D] the target's h_t (None for an ssm).
        Rows t < j of pass j have no root in the sequence and must not be scored.
        """
        b, n = tokens.shape
        eps = self.cfg.rms_norm_eps
        emb = F.embedding(tokens, self.embed)
        if self.embed_scale is not None:
            emb = emb * self.embed_scale
        emb = F.rms_norm(emb, emb.shape[-1:], eps=eps) * self.p("embed_norm.weight")
        cos, sin = self.rope.lookup(torch.arange(n))
        kv_cache: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self.cfg.num_layers)]
        outs: list[torch.Tensor] = []
        feat = features
        for j in range(passes if self.cfg.features else 1):
            if self.cfg.features:
                f = F.rms_norm(feat, feat.shape[-1:], eps=eps) * self.p("feature_norm.weight")
                x = torch.cat([f, emb], dim=-1)
            else:
                x = emb
            h = x @ self.p("fc.weight").T
            mask = _unroll_mask(n, j)
            for layer in range(self.cfg.num_layers):
                h = self._block(layer, h, cos, sin, mask, kv_cache[layer])
            out = F.rms_norm(h, h.shape[-1:], eps=eps) * self.p("norm.weight")
            outs.append(out)
            # row t of the next pass reads this pass's guess at row t-1 (row 0 gets a placeholder, never scored)
            feat = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        return outs

    def _block(self, n: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:  # x: [B, L, D]
        c, pre = self.cfg, f"layers.{n}."
        b, length, _ = x.shape
        hx = F.rms_norm(x, x.shape[-1:], eps=c.rms_norm_eps) * self.p(pre + "input_layernorm.weight")
        q = (hx @ self.p(pre + "self_attn.q_proj.weight").T).view(b * length, c.num_heads, c.head_dim)
        k = (hx @ self.p(pre + "self_attn.k_proj.weight").T).view(b * length, c.num_kv_heads, c.head_dim)
        v = (hx @ self.p(pre + "self_attn.v_proj.weight").T).view(b, length, c.num_kv_heads, c.head_dim)
        cs, sn = cos.repeat(b, 1, 1), sin.repeat(b, 1, 1)
        q = apply_rope(q, cs, sn).view(b, length, c.num_heads, c.head_dim).transpose(1, 2)
        k = apply_rope(k, cs, sn).view(b, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cache.append((k, v.transpose(1, 2)))
        keys = torch.cat([kk for kk, _ in cache], dim=2)    # [B, KV, (j+1) L, hd]
        values = torch.cat([vv for _, vv in cache], dim=2)
        rep = c.num_heads // c.num_kv_heads
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=c.head_dim ** -0.5)
        att = att.transpose(1, 2).reshape(b, length, c.num_heads * c.head_dim)
        h = x + att @ self.p(pre + "self_attn.o_proj.weight").T
        hm = F.rms_norm(h, h.shape[-1:], eps=c.rms_norm_eps) * self.p(pre + "post_attention_layernorm.weight")
        gate, up = hm @ self.p(pre + "mlp.gate_proj.weight").T, hm @ self.p(pre + "mlp.up_proj.weight").T
        return h + (F.silu(gate) * up) @ self.p(pre + "mlp.down_proj.weight").T


def _unroll_mask(n: int, j: int) -> torch.Tensor:
    """[n, (j+1) n] bool: pass j's row t sees pass 0's rows <= t-j and pass i's row t-j+i (i = 1..j)."""
    t = torch.arange(n)
    parts = [t[None, :] <= (t[:, None] - j)]
    for i in range(1, j + 1):
        parts.append(t[None, :] == (t[:, None] - j + i))
    return torch.cat(parts, dim=1)  # rows t < j (no root in the sequence) still see themselves
