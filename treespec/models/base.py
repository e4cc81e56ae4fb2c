"""CausalLM: the decoder stack every family shares; a family only supplies its decoder block class.

forward(tokens, positions, seqs) runs one flat ragged batch: projections and MLPs over all T rows at once,
attention per request (each has its own KV cache and mask). The model knows nothing about speculation: a
token tree is just rows whose positions repeat and whose mask (from SeqAttention) is not a chain.
"""
from __future__ import annotations

from typing import Sequence

import torch

from treespec.attention import AttentionBackend, select_attention
from treespec.attention.metadata import SeqAttention
from treespec.errors import ModelLoadError
from treespec.kv.cache import KVCache
from treespec.models.config import ModelConfig
from treespec.models.decode_stack import DecodeStack, signature
from treespec.models.layers import Embedding, ForwardBatch, HFLoadable, RMSNorm, RotaryTable
from treespec.models.lm_head import LMHead
from treespec.models.truncated_head import TruncatedHead

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here
_LIST_AT_MOST = 6
_STACKS_KEPT = 8  # decoder stacks kept per model (the whole model, a self-draft's subsets)


class CausalLM(HFLoadable):
    """Decoder-only LM over HF weights. Subclasses set `block`: (config, layer index, attention fn) -> module
    with forward(x [T, D], batch: ForwardBatch) -> [T, D].

    As a draft model (models/draft_model.py) it keeps its own cache and drafts over its full head."""

    block: type[torch.nn.Module]
    shares_target_cache = False
    truncated_head: TruncatedHead | None = None

    def __init__(self, config: ModelConfig, attention: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        attend = select_attention(attention, config.attn_logit_softcapping)
        with torch.device("meta"):  # weights arrive through load_state_dict_hf
            self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.embed_scale)
            self.layers = torch.nn.ModuleList(self.block(config, i, attend) for i in range(config.num_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.rope_full = RotaryTable(config.rope, config.head_dim)
        self.rope_local = (self.rope_full if config.rope_local == config.rope
                           else RotaryTable(config.rope_local, config.head_dim))
        self.lm_head: LMHead | None = None
        self.use_decode_stack = True  # tests and benchmarks turn it off to run the modules' own forward
        self._decode_stacks: dict[tuple[int, ...], DecodeStack | None] = {}

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention],
                blocks: Sequence[torch.nn.Module] | None = None) -> torch.Tensor:
        """Final-normed hidden states [T, D] of tokens: [T] at positions: [T].

        seqs: each request's rows and cache (reserve() done by the caller, which also commits).
        blocks: the decoder blocks to run, in order (default all of self.layers; self-speculative drafting runs a
        subset of them, or quantized copies, each writing the cache layer of its own index).
        """
        tokens, positions = tokens.to(self.device), positions.to(self.device)  # no-ops on the CPU
        return self.norm(self.run_blocks(self.embed_tokens(tokens), positions, seqs, blocks))

    def run_blocks(self, h: torch.Tensor, positions: torch.Tensor, seqs: list[SeqAttention],
                   blocks: Sequence[torch.nn.Module] | None = None) -> torch.Tensor:
        """The decoder blocks over hidden states h: [T, D] -> [T, D], before the final norm (a pipeline stage runs
        its own blocks on the activations the previous stage sent)."""
        full = self.rope_full.lookup(positions, h.dtype)
        local = full if self.rope_local is self.rope_full else self.rope_local.lookup(positions, h.dtype)
        batch = ForwardBatch.build(h, positions, seqs, {False: full, True: local})
        blocks = self.layers if blocks is None else blocks
        stack = self.decode_stack(blocks) if batch.cached else None
        if stack is not None:
            return stack.run(h, batch)
        for block in blocks:
            h = block(h, batch)
        return h

    def decode_stack(self, blocks: Sequence[torch.nn.Module]) -> DecodeStack | None:
        """The blocks as one C++ call (models/decode_stack.py), built once per set of blocks and projections;
        None where they cannot run there or `use_decode_stack` is off."""
        if not self.use_decode_stack:
            return None
        key = signature(blocks)
        if key not in self._decode_stacks:
            if len(self._decode_stacks) >= _STACKS_KEPT:  # a self-draft may try many subsets of the blocks
                del self._decode_stacks[next(iter(self._decode_stacks))]
            self._decode_stacks[key] = DecodeStack.build(blocks)
        return self._decode_stacks[key]

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [T, D] -> [T, V] fp32
        return self.lm_head.logits(hidden)

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        w = self.embed_tokens.weight  # the cache follows the model's device and dtype
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, max_len, dtype=w.dtype, device=w.device)

    # ------------------------------------------------------------------------------------------- weights

    def canonical_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map checkpoint names onto the text model's HF names (a family hook; identity here)."""
        return tensors

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"model.{k}": s for k, s in super().hf_shapes().items()}
        if not self.config.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.config.vocab_size, self.config.hidden_size)
        return shapes

    def load_state_dict_hf(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take weights from an HF-named state dict (checked first: one error lists every mismatch).

        Tensors are used as fp32 without copying where possible; a tied head shares the embedding.
        """
        tensors = self.canonical_names(tensors)
        expected = self.hf_shapes()
        _check_tensors(expected, tensors, self.config)
        get = lambda name: tensors[name].to(torch.float32)  # noqa: E731
        super().load_hf(lambda name: get(f"model.{name}"))
        head = self.embed_tokens.weight.detach() if self.config.tie_word_embeddings else get("lm_head.weight")
        self.lm_head = LMHead(head, self.config.final_logit_softcapping)


def _check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor],
                   config: ModelConfig) -> None:
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected and k not in ignorable
                  and not k.endswith(_IGNORED_SUFFIXES)]
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {s})" for k, s in expected.items()
             if k in tensors and tuple(tensors[k].shape) != s]
    problems = [f"{label} {len(names)}: {_first_few(names)}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if names]
    if problems:
        raise ModelLoadError(f"checkpoint does not fit the {config.model_type} config "
                             f"({config.num_layers} layers, hidden {config.hidden_size}): " + "; ".join(problems))


def _first_few(names: list[str]) -> str:
    more = " ..." if len(names) > _LIST_AT_MOST else ""
    return ", ".join(names[:_LIST_AT_MOST]) + more
