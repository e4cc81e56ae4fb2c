"""Learned drafters trained by `treespec distill`: one small network serves both kinds.

- `head` (EAGLE-style, feature level): row t reads the pair (target feature h_t, token x_{t+1}) and predicts
  x_{t+2}; its output hidden is also its guess of h_{t+1}, which feeds the next draft level.
- `ssm` (a small LM): the same network without the feature input, reading tokens only.

Network: RMSNorm'd token embedding (the target's, frozen; for `head` concatenated with the RMSNorm'd feature)
-> fc -> Llama decoder blocks (RoPE, causal attention with their own KV cache) -> RMSNorm -> the target's
output rows of the `draft_vocab` most frequent tokens (frozen). Only fc, the blocks and the norms are trained and
shipped, so a drafter for a 262k-vocabulary model stays a few MB. Positions: row t sits at position t.

The file format: `drafter.safetensors` (trained tensors + `vocab_ids` [N]) and `config.json` (DraftNetConfig).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import torch

from treespec.attention import select_attention
from treespec.attention.metadata import SeqAttention
from treespec.errors import ConfigError
from treespec.kv.cache import KVCache
from treespec.models.config import ModelConfig, RopeConfig
from treespec.models.layers import ForwardBatch, RotaryTable, pack_linears, rms_norm
from treespec.models.llama import LLAMA, LlamaBlock
from treespec.models.matmul import few_rows_linear
from treespec.models.truncated_head import TruncatedHead, VocabSubset

WEIGHTS_FILE, CONFIG_FILE = "drafter.safetensors", "config.json"


class DraftNetKind(Enum):
    HEAD = "head"  # reads the target's features (EAGLE)
    SSM = "ssm"    # reads tokens only


@dataclass(frozen=True)
class DraftNetConfig:
    kind: DraftNetKind
    hidden_size: int          # the target's
    target_vocab_size: int
    draft_vocab_size: int     # rows of the output layer (most frequent target tokens)
    num_layers: int = 1
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    target: str = ""          # the target it was distilled from (informational)

    @property
    def features(self) -> bool:
        return self.kind is DraftNetKind.HEAD

    @property
    def input_size(self) -> int:
        return 2 * self.hidden_size if self.features else self.hidden_size

    def model_config(self) -> ModelConfig:
        """The decoder blocks' config (a Llama one: the runtime reuses the target families' block)."""
        rope = RopeConfig(self.rope_theta)
        return ModelConfig(LLAMA.model_type, self.draft_vocab_size, self.hidden_size, self.intermediate_size,
                           self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim, self.rms_norm_eps,
                           rope, rope, self.max_position_embeddings, False, None, (False,) * self.num_layers)

    def to_json(self) -> dict:
        return {**asdict(self), "kind": self.kind.value}

    @classmethod
    def from_json(cls, d: dict) -> "DraftNetConfig":
        try:
            d = dict(d)
            d["kind"] = DraftNetKind(d.get("kind"))
            cfg = cls(**d)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: not a treespec drafter config: {e}") from None
        dims = (cfg.hidden_size, cfg.target_vocab_size, cfg.draft_vocab_size, cfg.num_layers, cfg.num_heads,
                cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.max_position_embeddings)
        if any(not isinstance(x, int) or x <= 0 for x in dims) or cfg.num_heads % cfg.num_kv_heads \
                or cfg.head_dim % 2 or cfg.draft_vocab_size > cfg.target_vocab_size:
            raise ConfigError(f"model: inconsistent drafter config {d}")
        return cfg


def block_tensor_shapes(cfg: DraftNetConfig) -> dict[str, tuple[int, ...]]:
    """Every trained tensor (HF Llama names inside the blocks) and its shape."""
    d, q, kv, i = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"fc.weight": (d, cfg.input_size), "embed_norm.weight": (d,),
                                          "norm.weight": (d,)}
    if cfg.features:
        shapes["feature_norm.weight"] = (d,)
    for n in range(cfg.num_layers):
        p = f"layers.{n}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d),
                   p + "mlp.down_proj.weight": (d, i)}
    return shapes


def draft_blocks(cfg: DraftNetConfig, tensors: dict[str, torch.Tensor]) -> torch.nn.ModuleList:
    """The drafter's decoder blocks (the target families' Llama block) holding `tensors`, unpacked: DraftNet packs
    them for inference, distill/net.py trains them."""
    attend = select_attention(None, None)
    with torch.device("meta"):
        blocks = torch.nn.ModuleList(LlamaBlock(cfg.model_config(), i, attend) for i in range(cfg.num_layers))
    for n, block in enumerate(blocks):
        block.load_hf(lambda name, n=n: tensors[f"layers.{n}.{name}"])
    return blocks


def save_drafter(out_dir: Path, cfg: DraftNetConfig, tensors: dict[str, torch.Tensor], vocab_ids: torch.Tensor,
                 dtype: torch.dtype = torch.float16) -> None:
    """Write drafter.safetensors (trained tensors in `dtype`, vocab ids int64) and config.json."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    data["vocab_ids"] = vocab_ids.to(torch.int64).contiguous()
    save_file(data, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")


def load_drafter(path: str | Path) -> tuple[DraftNetConfig, dict[str, torch.Tensor], torch.Tensor]:
    """Read a drafter directory (safetensors only); ConfigError naming `model` for anything unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    root = Path(path)
    try:
        cfg = DraftNetConfig.from_json(json.loads((root / CONFIG_FILE).read_text()))
        tensors = load_file(str(root / WEIGHTS_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise ConfigError(f"model: cannot read the drafter at {str(path)!r}: {e}") from None
    ids = tensors.pop("vocab_ids", None)
    expected = block_tensor_shapes(cfg)
    wrong = sorted(set(expected) ^ set(tensors)) + [k for k in expected if k in tensors
                                                     and tuple(tensors[k].shape) != expected[k]]
    if ids is None or tuple(ids.shape) != (cfg.draft_vocab_size,) or wrong:
        raise ConfigError(f"model: the drafter's tensors do not fit its config.json: {wrong[:6] or 'vocab_ids'}")
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.target_vocab_size or ids.unique().numel() != ids.numel():
        raise ConfigError("model: the drafter's vocab_ids are not distinct target token ids")
    return cfg, {k: v.float() for k, v in tensors.items()}, ids.long()


class DraftNet(torch.nn.Module):
    """The inference network: the target's blocks (fused projections, tree masks, KV caches) over loaded weights.

    `logits` gives full-vocabulary rows (-inf outside the draft vocabulary), as every drafter's q must. A draft
    model (models/draft_model.py) with its own cache and a truncated head over its vocabulary.
    """

    shares_target_cache = False

    def __init__(self, cfg: DraftNetConfig, tensors: dict[str, torch.Tensor], vocab_ids: torch.Tensor,
                 target: torch.nn.Module) -> None:
        super().__init__()
        if cfg.hidden_size != target.config.hidden_size or cfg.target_vocab_size != target.config.vocab_size:
            raise ConfigError(f"model: the drafter was trained for hidden size {cfg.hidden_size} / vocabulary "
                              f"{cfg.target_vocab_size}, the target has {target.config.hidden_size} / "
                              f"{target.config.vocab_size}")
        self.net_config, self.config = cfg, cfg.model_config()
        self.layers = draft_blocks(cfg, tensors)
        pack_linears(self.layers)
        self.fc = tensors["fc.weight"]
        self.embed_norm, self.norm = tensors["embed_norm.weight"], tensors["norm.weight"]
        self.feature_norm = tensors.get("feature_norm.weight")
        self.rope = RotaryTable(self.config.rope, cfg.head_dim)
        self.embed = target.embed_tokens
        self.truncated_head = TruncatedHead(target.lm_head, VocabSubset.fixed(cfg.target_vocab_size, vocab_ids))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention],
                features: torch.Tensor | None = None) -> torch.Tensor:
        """Output hidden states [T, D] for tokens [T] at positions [T] (+ features [T, D] for a head)."""
        eps = self.net_config.rms_norm_eps
        x = rms_norm(self.embed(tokens), self.embed_norm, eps)
        if self.feature_norm is not None:
            x = torch.cat([rms_norm(features, self.feature_norm, eps), x], dim=-1)
        h = few_rows_linear(self.fc, x)
        cos_sin = self.rope.lookup(positions)
        batch = ForwardBatch.build(h, positions, seqs, {False: cos_sin, True: cos_sin})
        for block in self.layers:
            h = block(h, batch)
        return rms_norm(h, self.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [T, D] -> [T, V] fp32
        return self.truncated_head.logits(hidden)

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, max_len, dtype=torch.float32)
