"""kernels/decode_stack: a forward's decoder layers in one C++ call equal the modules' own glue path bit for bit
(hidden states and K/V caches), for a tree, a decode step and two requests at once, in every block kind."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.tiny_hf import HF_CLASSES, _configs, ancestor_mask
from treespec.attention.metadata import SeqAttention
from treespec.kernels import decode_stack
from treespec.kernels.block_layout import PackedBlocks, with_bits
from treespec.models import CausalLM, build_model
from treespec.models.decode_stack import DecodeStack
from treespec.models.quant_blocks import BlockQuantLinear

needs_kernel = pytest.mark.skipif(decode_stack.compiled() is None, reason="decode stack cannot be built here")
# head_dim 16 (the cached glue's), and widths the blocks' groups of 32 divide
SHAPES = dict(hidden_size=64, intermediate_size=96, head_dim=16)
FAMILIES = ("llama_bias_tied", "mistral", "qwen3", "gemma3")  # biases, sliding window, q/k norm, sandwich norms
KINDS = ("int8", "nibbles", "int8_g16")


def random_blocks(out_f: int, in_f: int, kind: str, g: torch.Generator) -> PackedBlocks:
    """Q8_0-like int8 codes, Q4_K-like nibbles with mins, or Q6_K-like 16-groups: the kernel's three paths."""
    group = 16 if kind == "int8_g16" else 32
    scale = (torch.rand(out_f, in_f // group, generator=g) * 0.1).half().float()  # short scales, as nibbles need
    if kind == "nibbles":
        q = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int8)
        return with_bits(PackedBlocks(q, scale, torch.rand(out_f, in_f // group, generator=g) * 0.3, group), 4)
    q = torch.randint(-31, 32, (out_f, in_f), generator=g, dtype=torch.int8)
    return PackedBlocks(q, scale, None, group)


def blocks_model(family: str) -> CausalLM:
    """A tiny model of the family whose projections all run from random blocks of mixed kinds."""
    cfg = _configs()[family].to_dict() | SHAPES
    cfg_obj = type(_configs()[family]).from_dict(cfg)
    cfg_obj._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = HF_CLASSES[cfg_obj.model_type](cfg_obj).eval()
    model = build_model(hf.config.to_dict(), hf.state_dict())
    g = torch.Generator().manual_seed(1)
    for i, block in enumerate(model.layers):
        for j, (parent, name) in enumerate(((block.self_attn, "qkv_proj"), (block.self_attn, "o_proj"),
                                            (block.mlp, "gate_up_proj"), (block.mlp, "down_proj"))):
            old = getattr(parent, name)
            kind = KINDS[(i + j) % len(KINDS)]
            setattr(parent, name, BlockQuantLinear(random_blocks(old.out_features, old.in_features, kind, g), old.bias))
    return model


def forwards(model: CausalLM, stack: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A 12-token prefill of two requests, then both at once (a 5-node tree and a decode step), then a decode step
    of the first: every forward's hidden states and both caches' written slots."""
    model.use_decode_stack = stack
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (12,), generator=gen)
    caches = [model.new_cache(32), model.new_cache(32)]
    outs = []
    with torch.inference_mode():
        for c in caches:
            c.reserve(12)
            outs.append(model(prompt, torch.arange(12), [SeqAttention(c, 0, 12)]))
            c.commit()
        parents = [-1, 0, 0, 1, 2]
        tree_pos, step_pos = 12 + torch.tensor([0, 1, 1, 2, 2]), torch.tensor([12])
        caches[0].reserve(5, tree_pos)
        caches[1].reserve(1)
        seqs = [SeqAttention(caches[0], 0, 5, ancestor_mask(parents)), SeqAttention(caches[1], 5, 1)]
        outs.append(model(prompt[:6], torch.cat([tree_pos, step_pos]), seqs))
        caches[0].commit([0, 2])
        caches[1].commit()
        caches[0].reserve(1)
        outs.append(model(prompt[:1], torch.tensor([14]), [SeqAttention(caches[0], 0, 1)]))
        caches[0].commit()
    return outs, [t[:, :, :c.length] for c in caches for t in (c.k, c.v)]


@needs_kernel
@pytest.mark.parametrize("family", FAMILIES)
def test_the_stack_equals_the_modules_bit_for_bit(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = blocks_model(family)
    runs = []
    monkeypatch.setattr(DecodeStack, "run", lambda self, h, batch, run=DecodeStack.run: (runs.append(h.shape[0]),
                                                                                        run(self, h, batch))[1])
    stacked, stacked_caches = forwards(model, stack=True)
    assert runs == [12, 12, 6, 1]  # short prefills (<= 64 rows) take the cached glue path, so the stack, too
    modules, module_caches = forwards(model, stack=False)
    assert runs == [12, 12, 6, 1]
    for a, b in zip(stacked + stacked_caches, modules + module_caches):
        assert torch.equal(a, b)
