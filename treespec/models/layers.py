"""Building blocks shared by every family: RMSNorm, RoPE tables, fused attention and MLP, HF weight loading.

Modules are created on the meta device and receive their weights from an HF state dict through `load_hf`,
so building a model never spends time on random initialisation. Each HF-loadable module names its children
like HF does, so the HF names of a whole block follow from the module tree; only the fused leaves (q/k/v
in one matrix, gate/up in one matrix: one weight read per step instead of three or two) map names by hand.
`hf_tensors` is the inverse of `load_hf`: distill/net.py trains these modules and saves them under HF names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from treespec.attention import AttentionFn
from treespec.attention.metadata import SeqAttention
from treespec.attention.sdpa import fast_attention
from treespec.kernels import decode_ops
from treespec.kv.cache import KVCache
from treespec.models.config import Activation, ModelConfig, RopeConfig, RopeType
from treespec.models.matmul import PACK_MIN_NUMEL, PACKED_MIN_ROWS, few_rows_linear, pack_weight, packed_linear

Getter = Callable[[str], torch.Tensor]  # HF tensor name (relative to the module) -> fp32 tensor


class HFLoadable(nn.Module):
    """A module whose weights come from HF tensors named after its own submodules."""

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor this module needs (names relative to it) and its shape."""
        return {f"{name}.{k}": s for name, child in _hf_children(self) for k, s in child.hf_shapes().items()}

    def load_hf(self, get: Getter) -> None:
        for name, child in _hf_children(self):
            child.load_hf(_scoped(get, name))

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The HF tensors (names relative to this module, detached) that load_hf would turn into this module."""
        return {f"{name}.{k}": t for name, child in _hf_children(self) for k, t in child.hf_tensors().items()}


def _hf_children(module: nn.Module) -> Iterator[tuple[str, HFLoadable]]:
    for name, child in module.named_children():
        if isinstance(child, HFLoadable):
            yield name, child
        elif isinstance(child, nn.ModuleList):
            for i, c in enumerate(child):
                if isinstance(c, HFLoadable):
                    yield f"{name}.{i}", c


def _scoped(get: Getter, prefix: str) -> Getter:
    return lambda name: get(f"{prefix}.{name}")


_MM_MAX_ROWS = 64  # without a packed weight: up to here the transposed product wins; prefill keeps F.linear


class Linear(nn.Linear):
    """nn.Linear for inference. With the CPU products (models/device_kernels.py: the default): 1-2 rows through
    `few_rows_linear`, 3+ rows through a oneDNN copy of the weight made by `pack()` once the weights are final
    (see models/matmul.py for the measurements). With the portable ones: F.linear."""

    packed: torch.Tensor | None = None  # not a parameter: derived from `weight`, never saved
    cpu_products = True                 # False: plain F.linear (set once at load by models/device_kernels.py)

    def pack(self) -> bool:
        """Make (or refresh) the packed copy of the current weight; False when oneDNN is unavailable."""
        self.packed = pack_weight(self.weight)
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        if self.packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            return packed_linear(x, self.packed, self.bias)
        if x.shape[0] > _MM_MAX_ROWS or not self.cpu_products:
            return F.linear(x, self.weight, self.bias)
        y = few_rows_linear(self.weight, x)
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous()


def pack_linears(model: nn.Module, min_numel: int = PACK_MIN_NUMEL) -> int:
    """Pack every `Linear` of `model` with at least `min_numel` weights (call after loading, before timing
    anything); returns how many were packed."""
    return sum(m.pack() for m in model.modules() if isinstance(m, Linear) and m.weight.numel() >= min_numel)


def set_linear(linear: Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    linear.packed = None  # a packed copy of the old weight would be stale


def _split(linear: Linear, names: tuple[str, ...], rows: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A fused linear's weight (and bias) as the HF tensors `names`, of `rows` output rows each."""
    parts = {f"{n}.weight": w for n, w in zip(names, linear.weight.detach().split(rows))}
    if linear.bias is not None:
        parts |= {f"{n}.bias": b for n, b in zip(names, linear.bias.detach().split(rows))}
    return parts


# ---------------------------------------------------------------------------------------------------- norms

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., d] normalised over its last dim, times weight (broadcast against x: one row per head is fine).
    One C++ call where the kernel is built (decoding runs ~90 of these per token: kernels/decode_ops.py).
    Norm weights stay fp32 under a bf16/fp16 model: x is normalised in fp32 and rounded back, as transformers does."""
    if x.dtype != weight.dtype:
        return rms_norm(x.float(), weight, eps).to(x.dtype)
    return decode_ops.rms_norm(x, weight, eps)


class RMSNorm(HFLoadable):
    """RMSNorm over the last dim. Gemma's `(1 + w)` scale is folded into the weight at load time."""

    def __init__(self, shape: int | tuple[int, ...], eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else shape
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.empty(self.shape), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., *shape]
        return rms_norm(x, self.weight, self.eps)

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": self.shape[-1:]}

    def load_hf(self, get: Getter) -> None:
        self.assign(get("weight"))

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.hf_weight(self.weight.detach().reshape(-1, self.shape[-1])[0])}

    def hf_weight(self, row: torch.Tensor) -> torch.Tensor:
        """The HF weight of one row of this norm's weight (undoing Gemma's folded 1 + w)."""
        return row - 1.0 if self.unit_offset else row

    def assign(self, w: torch.Tensor) -> None:
        """Set the HF weight w (broadcast to this norm's shape, e.g. one row per head)."""
        scale = 1.0 + w if self.unit_offset else w
        self.weight = nn.Parameter(scale.expand(self.shape).contiguous(), requires_grad=False)


# ----------------------------------------------------------------------------------------------------- rope

def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim/2] inverse frequencies, scaled as transformers does for `rope.kind`."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.kind is RopeType.LINEAR:
        return inv / rope.factor
    if rope.kind is RopeType.LLAMA3:  # Llama 3.1: stretch low frequencies by `factor`, blend the middle band
        old = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * torch.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(middle, blended, scaled)
    return inv


class RotaryTable(nn.Module):
    """cos/sin of position * inv_freq for positions 0..capacity-1, grown (doubling) on demand, stored as
    apply_rope uses them: [cos, cos] and [-sin, sin] over the head dim."""

    def __init__(self, rope: RopeConfig, head_dim: int, capacity: int = 1024) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(rope, head_dim), persistent=False)
        self.register_buffer("cos", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim), persistent=False)
        self._fill(capacity)

    def _fill(self, capacity: int) -> None:
        pos = torch.arange(capacity, dtype=torch.float32, device=self.inv_freq.device)
        angles = pos[:, None] * self.inv_freq[None, :]  # [capacity, hd/2]
        cos, sin = angles.cos(), angles.sin()
        self.cos, self.sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    def lookup(self, positions: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, hd] (broadcast over heads), computed in fp32 and given in `dtype`
        (the activations' dtype, as transformers rounds them)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            self._fill(max(need, 2 * self.cos.shape[0]))
        cos, sin = self.cos[positions, None], self.sin[positions, None]
        return (cos, sin) if dtype == cos.dtype else (cos.to(dtype), sin.to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, heads, hd] by RotaryTable rows cos, sin: [T, 1, hd], pairing dim i with i + hd/2 (HF's
    rotate_half): x * [cos, cos] + [x2, x1] * [-sin, sin], three ops instead of seven."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


# ------------------------------------------------------------------------------------------------ attention

@dataclass
class ForwardBatch:
    """What every layer of one forward shares: the requests, their RoPE rows, masks built once per window, and
    whether the layers run decode_ops' glue (`glue`: fp32 on the CPU, kernels built, no autograd) and its cached
    attention (`cached`: also every request few rows and a plain fp32 KVCache)."""
    seqs: list[SeqAttention]
    positions: torch.Tensor                                 # [T]
    rope: dict[bool, tuple[torch.Tensor, torch.Tensor]]     # sliding layer? -> cos, sin [T, 1, hd]
    glue: bool = False
    cached: bool = False
    _masks: dict[tuple[int, int | None], tuple[torch.Tensor | None, int]] = field(default_factory=dict)

    @classmethod
    def build(cls, h: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention],
              rope: dict[bool, tuple[torch.Tensor, torch.Tensor]]) -> "ForwardBatch":  # h: [T, D]
        glue = decode_ops.glue_runs(h)
        cached = glue and all(s.n <= decode_ops.MAX_KERNEL_ROWS and isinstance(s.cache, KVCache)
                              and s.cache.k.dtype is torch.float32 for s in seqs)
        return cls(seqs, positions, rope, glue, cached)

    def mask(self, r: int, window: int | None) -> tuple[torch.Tensor | None, int]:
        """Request r's mask over its visible slots from `first` on: (mask [n, visible - first] or None when
        every one of those keys is allowed, first). Committed slot j holds position j, so slots before
        min(query position) - window + 1 are outside every query's window and need no attention at all."""
        key = (r, window)
        if key not in self._masks:
            s = self.seqs[r]
            if s.n == 1 and s.tree_mask is None and s.cache.pending == 1:  # a decode step: first on, every key
                p = int(self.positions[s.start])
                self._masks[key] = (None, 0 if window is None else max(0, min(p - window + 1, s.cache.length)))
                return self._masks[key]
            pos = self.positions[s.start:s.start + s.n]
            first = 0 if window is None else max(0, min(int(pos.min()) - window + 1, s.cache.length))
            m = s.mask(pos, window)[:, first:]
            self._masks[key] = (None if bool(m.all()) else m, first)
        return self._masks[key]


class Attention(HFLoadable):
    """Self-attention with q/k/v fused into one projection; K/V go to each request's cache."""

    def __init__(self, cfg: ModelConfig, layer: int, attend: AttentionFn) -> None:
        super().__init__()
        self.layer, self.attend = layer, attend
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding, self.window = cfg.sliding_layers[layer], cfg.window(layer)
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_logit_softcapping
        q_dim, kv_dim, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
        self.qkv_proj = Linear(d, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_dim, d, bias=cfg.o_bias)
        # one norm over q and k heads at once: rows 0..H-1 carry q_norm's weight, the rest k_norm's
        self.qk_norm = (RMSNorm((cfg.num_heads + cfg.num_kv_heads, cfg.head_dim), cfg.rms_norm_eps,
                                cfg.norm_unit_offset) if cfg.qk_norm else None)
        self._hf = {"q_proj.weight": (q_dim, d), "k_proj.weight": (kv_dim, d), "v_proj.weight": (kv_dim, d),
                    "o_proj.weight": (d, q_dim)}
        if cfg.qkv_bias:
            self._hf |= {"q_proj.bias": (q_dim,), "k_proj.bias": (kv_dim,), "v_proj.bias": (kv_dim,)}
        if cfg.o_bias:
            self._hf["o_proj.bias"] = (d,)
        if cfg.qk_norm:
            self._hf |= {"q_norm.weight": (cfg.head_dim,), "k_norm.weight": (cfg.head_dim,)}

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._hf)

    def load_hf(self, get: Getter) -> None:
        qkv = [f"{p}_proj" for p in "qkv"]
        bias = torch.cat([get(f"{p}.bias") for p in qkv]) if self.qkv_proj.bias is not None else None
        set_linear(self.qkv_proj, torch.cat([get(f"{p}.weight") for p in qkv]), bias)
        set_linear(self.o_proj, get("o_proj.weight"), get("o_proj.bias") if self.o_proj.bias is not None else None)
        if self.qk_norm is not None:
            q_w, k_w = get("q_norm.weight"), get("k_norm.weight")
            self.qk_norm.assign(torch.cat([q_w.expand(self.heads, -1), k_w.expand(self.kv_heads, -1)]))

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = _split(self.qkv_proj, ("q_proj", "k_proj", "v_proj"), (q_dim, kv_dim, kv_dim))
        out |= _split(self.o_proj, ("o_proj",), (self.o_proj.out_features,))
        if self.qk_norm is not None:
            norm, w = self.qk_norm, self.qk_norm.weight.detach()
            out |= {"q_norm.weight": norm.hf_weight(w[0]), "k_norm.weight": norm.hf_weight(w[self.heads])}
        return out

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:  # x: [T, D] -> [T, D]
        t, h, kv, hd = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                          # [T, (H + 2 KV) hd]
        glue = batch.glue and hd % 16 == 0
        qk = self._qk(qkv, batch, glue)                 # [T, H + KV, hd]: normed and rotated
        if glue and batch.cached and self.attend is fast_attention:
            out = qkv.new_empty(t, h * hd)
            for r, s in enumerate(batch.seqs):
                mask, first = batch.mask(r, self.window)
                decode_ops.cached_attention(qk, qkv, (s.start, s.n), s.cache.k, s.cache.v, self.layer,
                                            (s.cache.visible - s.n, first), mask, self.scale, out)
            return self.o_proj(out)
        q, k = qk[:, :h], qk[:, h:]                     # [T, H, hd], [T, KV, hd]
        v = qkv[:, (h + kv) * hd:].view(t, kv, hd)
        out = None if len(batch.seqs) == 1 else q.new_empty(t, h, hd)
        for r, s in enumerate(batch.seqs):
            rows = slice(s.start, s.start + s.n)
            k_all, v_all = s.cache.write(self.layer, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            mask, first = batch.mask(r, self.window)
            o = self.attend(q[rows].transpose(0, 1), k_all[:, first:], v_all[:, first:], mask,
                            self.scale, self.softcap).transpose(0, 1)  # [n, H, hd]
            if out is None:
                out = o
            else:
                out[rows] = o
        return self.o_proj(out.reshape(t, h * hd))

    def _qk(self, qkv: torch.Tensor, batch: ForwardBatch, glue: bool) -> torch.Tensor:  # -> [T, H + KV, hd]
        """The q and k heads of qkv: [T, (H + 2 KV) hd], normed (qk_norm) and rotated; one glue call where it runs
        (the same numbers as torch's ops, tests/test_decode_glue.py)."""
        t, heads = qkv.shape[0], self.heads + self.kv_heads
        norm = self.qk_norm
        if glue:
            return decode_ops.qk_norm_rope(qkv, None if norm is None else norm.weight, 0.0 if norm is None else norm.eps,
                                           *batch.rope[self.sliding], heads)
        qk = qkv[:, :heads * self.head_dim].view(t, heads, self.head_dim)
        return apply_rope(qk if norm is None else norm(qk), *batch.rope[self.sliding])


# ------------------------------------------------------------------------------------------------------ mlp

_ACTIVATIONS: dict[Activation, Callable[[torch.Tensor], torch.Tensor]] = {
    Activation.SILU: F.silu,
    Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
    Activation.GELU: F.gelu,
}


class MLP(HFLoadable):
    """Gated MLP, down(act(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.act = _ACTIVATIONS[cfg.activation]
        self.act_code = decode_ops.ACTIVATION_CODES[cfg.activation.value]
        self.gate_up_proj = Linear(d, 2 * i, bias=b)
        self.down_proj = Linear(i, d, bias=b)
        names = ("gate_proj", "up_proj", "down_proj")
        self._hf = {f"{n}.weight": s for n, s in zip(names, ((i, d), (i, d), (d, i)))}
        if b:
            self._hf |= {f"{n}.bias": s for n, s in zip(names, ((i,), (i,), (d,)))}

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._hf)

    def load_hf(self, get: Getter) -> None:
        b = self.down_proj.bias is not None
        set_linear(self.gate_up_proj, torch.cat([get("gate_proj.weight"), get("up_proj.weight")]),
                    torch.cat([get("gate_proj.bias"), get("up_proj.bias")]) if b else None)
        set_linear(self.down_proj, get("down_proj.weight"), get("down_proj.bias") if b else None)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        i, d = self.down_proj.in_features, self.down_proj.out_features
        gate_up = _split(self.gate_up_proj, ("gate_proj", "up_proj"), (i, i))
        return gate_up | _split(self.down_proj, ("down_proj",), (d,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, D] -> [T, D]
        gate_up = self.gate_up_proj(x)
        if decode_ops.glue_runs(gate_up):
            return self.down_proj(decode_ops.act_mul(gate_up, self.act_code))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Embedding(HFLoadable):
    """Token embedding, times a constant scale where the family uses one (Gemma: sqrt(hidden_size))."""

    def __init__(self, vocab_size: int, dim: int, scale: float | None) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": tuple(self.weight.shape)}

    def load_hf(self, get: Getter) -> None:
        self.weight = nn.Parameter(get("weight"), requires_grad=False)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach()}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [T] -> [T, D]
        h = F.embedding(tokens, self.weight)
        return h if self.scale is None else h * self.scale
