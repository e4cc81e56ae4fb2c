"""Decoder blocks described to kernels/decode_stack.cpp, which runs them in one C++ call.

A stack is built for the blocks of a forward where every one of them can run there: a sandwich (Gemma 3) or
pre-norm (Llama family) block whose projections are all BlockQuantLinear (a GGUF in blocks mode), whose
attention is the CPU fast path with head_dim % 16 == 0, all with the same shapes. Everything else keeps the
modules' own forward, which stays the stack's twin.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from treespec.attention.sdpa import fast_attention
from treespec.kernels import decode_stack
from treespec.models.layers import Attention, ForwardBatch, MLP

if TYPE_CHECKING:
    from treespec.models.quant_blocks import BlockQuantLinear

_EMPTY = torch.empty(0)
_NO_MASK = torch.empty(0, dtype=torch.bool)


def products(block: nn.Module) -> tuple[nn.Module, ...]:
    """The block's attention, MLP and four projections, read without Module.__getattr__ (once per block and step)."""
    if "self_attn" not in block._modules or "mlp" not in block._modules:
        return ()
    attn, mlp = block._modules["self_attn"], block._modules["mlp"]
    a, m = attn._modules, mlp._modules
    return attn, mlp, a["qkv_proj"], a["o_proj"], m["gate_up_proj"], m["down_proj"]


def signature(blocks: Sequence[nn.Module]) -> tuple[int, ...]:
    """Identity of the blocks and of their projections: a stack holds their tensors, so a swap means a new one."""
    return tuple(id(m) for b in blocks for m in (b, *products(b)))


def _plain(w: torch.Tensor) -> bool:
    """A norm weight the glue kernels take as they are: one fp32 row of a multiple of 8, contiguous."""
    return w.dtype is torch.float32 and w.dim() == 1 and w.shape[0] % 8 == 0 and w.is_contiguous()


class DecodeStack:
    """The blocks as kernels/decode_stack.cpp layers; `run` is their forward on a ForwardBatch with `cached` set."""

    def __init__(self, ext, layers: list, windows: list[int | None], attn: Attention, act: int,
                 sandwich: bool) -> None:
        self.windows, self.seq = windows, ext.Seq
        self.stack = ext.Stack(layers, attn.heads, attn.kv_heads, attn.head_dim, attn.scale, act, sandwich)

    @classmethod
    def build(cls, blocks: Sequence[nn.Module]) -> "DecodeStack | None":
        """None unless every block can run in the stack (module docstring) and the stack is built here."""
        from treespec.models.quant_blocks import BlockQuantLinear  # it imports the kernels, which import this package
        ext = decode_stack.compiled()
        if ext is None or not blocks or not all(hasattr(b, "stack_norms") and products(b) for b in blocks):
            return None
        parts = [products(b) for b in blocks]
        norms_of = [b.stack_norms() for b in blocks]
        attn0, mlp0 = parts[0][0], parts[0][1]
        sandwich = norms_of[0][2] is not None
        shape = lambda a, m: (a.heads, a.kv_heads, a.head_dim, a.scale, m.act_code)  # noqa: E731
        eps = norms_of[0][0].eps
        for norms, (attn, mlp, *projs) in zip(norms_of, parts):
            if not (isinstance(attn, Attention) and isinstance(mlp, MLP) and attn.attend is fast_attention
                    and attn.head_dim % 16 == 0 and shape(attn, mlp) == shape(attn0, mlp0)
                    and (norms[2] is not None) == sandwich and all(isinstance(p, BlockQuantLinear) for p in projs)
                    and all(n is None or _plain(n.weight) and n.eps == eps for n in norms)):
                return None
        windows = sorted({p[0].window for p in parts}, key=lambda w: -1 if w is None else w)
        layers = [cls._layer(ext, norms, attn, projs, windows) for norms, (attn, _, *projs) in zip(norms_of, parts)]
        return cls(ext, layers, windows, attn0, mlp0.act_code, sandwich)

    @staticmethod
    def _layer(ext, norms: tuple, attn: Attention, projs: list[BlockQuantLinear], windows: list[int | None]):
        """One block (its stack_norms, attention and projections) as a kernels/decode_stack.cpp Layer, holding (not
        copying) its tensors."""
        def product(p: BlockQuantLinear):
            b = p._buffers
            return ext.Product(b["q"], b["scale"], _EMPTY if b["min"] is None else b["min"],
                               _EMPTY if p.bias is None else p.bias.detach(), p.group)
        norm_in, norm_mid, post_attn, post_mlp = norms
        weight = lambda n: _EMPTY if n is None else n.weight.detach()  # noqa: E731
        qk = attn.qk_norm
        return ext.Layer(*map(product, projs), weight(norm_in), weight(norm_mid), weight(post_attn),
                         weight(post_mlp), weight(qk), norm_in.eps, 0.0 if qk is None else qk.eps, attn.layer,
                         int(attn.sliding), windows.index(attn.window))

    def run(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # h: [T, D] -> [T, D]
        """The blocks' forward over h, as their modules compute it with batch.cached set."""
        seqs = []
        for r, s in enumerate(batch.seqs):
            masks = [batch.mask(r, w) for w in self.windows]
            seqs.append(self.seq(
                s.start, s.n, s.cache.visible - s.n, s.cache.k, s.cache.v, [first for _, first in masks],
                [_NO_MASK if m is None else m for m, _ in masks]))
        (cos_full, sin_full), (cos_local, sin_local) = batch.rope[False], batch.rope[True]
        return self.stack.run(h, [cos_full, cos_local], [sin_full, sin_local], seqs)
