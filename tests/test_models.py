"""Every family against transformers' eager implementation: prefill, cached decode, greedy text, trees,
ragged batches, layer subsets; and the config / weight-loading contract."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tiny_hf import (FAMILIES, HF_CLASSES, VOCAB, WINDOW, ancestor_mask, branch, decode, depths, hf_greedy, hf_logits,
                     hf_model, prefill, random_parents, twin)
from treespec.attention import AttentionBackend
from treespec.attention.metadata import SeqAttention, single
from treespec.errors import ModelLoadError
from treespec.models import FAMILIES as REGISTERED, build_model, model_config
from treespec.models.config import RopeConfig, RopeType
from treespec.models.layers import Linear, RotaryTable, apply_rope, pack_linears

TOL = 1e-4
PROMPT = 12  # longer than the sliding window


@pytest.fixture(scope="module", params=[(f, packed) for f in FAMILIES for packed in (False, True)],
                ids=lambda p: f"{p[0]}{'-packed' if p[1] else ''}")
def pair(request):
    """HF model and its treespec twin; `packed`: every projection through oneDNN (tiny weights are normally
    left unpacked), so the 3+-row path is checked against HF too."""
    family, packed = request.param
    hf = hf_model(family)
    model = twin(hf)
    if packed:
        assert pack_linears(model, min_numel=0) > 0
    return hf, model


@torch.inference_mode()
def test_prefill_and_cached_decode_match_hf(pair):
    hf, model = pair
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (PROMPT + 8,))
    ref = hf_logits(hf, tokens)
    cache, h = prefill(model, tokens[:PROMPT])
    torch.testing.assert_close(model.logits(h), ref[:PROMPT], atol=TOL, rtol=0)
    for t in range(PROMPT, PROMPT + 8):
        h = decode(model, cache, int(tokens[t]))
        torch.testing.assert_close(model.logits(h)[0], ref[t], atol=TOL, rtol=0)


@torch.inference_mode()
def test_greedy_32_tokens_match_hf(pair):
    hf, model = pair
    torch.manual_seed(2)
    prompt = torch.randint(0, VOCAB, (PROMPT,))
    cache, h = prefill(model, prompt)
    out = [int(model.lm_head.argmax(h[-1:]))]
    for _ in range(31):
        out.append(int(model.lm_head.argmax(decode(model, cache, out[-1]))))
    assert out == hf_greedy(hf, prompt, 32)


@torch.inference_mode()
def test_tree_forward_matches_hf_on_each_branch(pair):
    """Each node of one tree forward == a plain forward over prefix + that node's root-to-node branch."""
    hf, model = pair
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, VOCAB, (9,), generator=gen)
    parents = random_parents(10, gen)
    tokens = torch.randint(0, VOCAB, (10,), generator=gen)
    cache, _ = prefill(model, prefix)
    positions = len(prefix) + torch.tensor(depths(parents))
    cache.reserve(10, positions)
    h = model(tokens, positions, [SeqAttention(cache, 0, 10, ancestor_mask(parents))])
    logits = model.logits(h)
    for i in range(10):
        seq = torch.cat([prefix, tokens[branch(parents, i)]])
        torch.testing.assert_close(logits[i], hf_logits(hf, seq)[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
@torch.inference_mode()
def test_ragged_batch_equals_separate_forwards(name):
    """A prefill chunk, a decode step and a tree in one flat forward == each forward on its own."""
    model = twin(hf_model(name))
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (7, 10, 6)]
    parents = [-1, 0, 0, 1, 1, 2]
    work = [  # (committed prefix, new tokens, positions, tree mask)
        (prompts[0][:3], prompts[0][3:], torch.arange(3, 7), None),
        (prompts[1], torch.tensor([5]), torch.tensor([10]), None),
        (prompts[2], torch.randint(0, VOCAB, (6,), generator=gen), 6 + torch.tensor(depths(parents)),
         ancestor_mask(parents)),
    ]
    alone, caches, seqs, start = [], [], [], 0
    for prefix, new, pos, mask in work:
        c, _ = prefill(model, prefix)
        c.reserve(len(new), pos)
        alone.append(model(new, pos, [SeqAttention(c, 0, len(new), mask)]))
        c2, _ = prefill(model, prefix)
        c2.reserve(len(new), pos)
        caches.append(c2)
        seqs.append(SeqAttention(c2, start, len(new), mask))
        start += len(new)
    together = model(torch.cat([w[1] for w in work]), torch.cat([w[2] for w in work]), seqs)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=0)


@torch.inference_mode()
def test_layer_subset_equals_model_of_those_layers():
    """forward(blocks=layers 0 and 2) == a 2-layer model made of them (layer-skip self-speculation)."""
    hf = hf_model("qwen2")  # layers 1 and 2 slide, layer 0 does not
    cfg, state = hf.config.to_dict(), hf.state_dict()
    small_state = {k.replace("layers.2.", "layers.1."): v for k, v in state.items() if ".layers.1." not in k}
    small_cfg = {**cfg, "num_hidden_layers": 2, "layer_types": [cfg["layer_types"][0], cfg["layer_types"][2]]}
    model, small = build_model(cfg, state), build_model(small_cfg, small_state)
    tokens = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(32)
    cache.reserve(PROMPT)
    h = model(tokens, torch.arange(PROMPT), single(cache, PROMPT),
              blocks=[model.layers[0], model.layers[2]])
    torch.testing.assert_close(h, prefill(small, tokens)[1], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_reference_attention_model_equals_sdpa_model():
    hf = hf_model("gemma3")
    tokens = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(6))
    h_ref = prefill(twin(hf, AttentionBackend.REFERENCE), tokens)[1]
    torch.testing.assert_close(prefill(twin(hf, AttentionBackend.SDPA), tokens)[1], h_ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- weights

def test_tied_head_shares_the_embedding():
    model = twin(hf_model("qwen3"))
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


def test_load_reports_every_mismatch_at_once():
    hf = hf_model("llama")
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(ModelLoadError) as e:
        build_model(hf.config.to_dict(), state)
    msg = str(e.value)
    assert "missing 1: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected 1: model.layers.0.self_attn.extra.weight" in msg
    assert "model.norm.weight (3,) (expected (48,))" in msg


def test_untied_model_needs_its_head():
    hf = hf_model("llama")
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(ModelLoadError, match="missing 1: lm_head.weight"):
        build_model(hf.config.to_dict(), state)


def test_modules_give_back_the_hf_tensors_they_loaded(pair):
    """hf_tensors inverts load_hf (fused q/k/v and gate/up split again, Gemma's 1 + w undone): distill saves by it."""
    hf, model = pair
    state = hf.state_dict()
    for prefix, module in [("model.embed_tokens.", model.embed_tokens)] + [
            (f"model.layers.{i}.", block) for i, block in enumerate(model.layers)]:
        want = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        got = module.hf_tensors()
        assert set(got) == set(want), prefix
        for name, t in got.items():
            torch.testing.assert_close(t, want[name], atol=1e-6, rtol=0, msg=prefix + name)


@torch.inference_mode()
def test_multimodal_gemma3_checkpoint_loads_its_text_model():
    hf = hf_model("gemma3")
    text_cfg = hf.config.to_dict()
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in hf.state_dict().items()}
    state["model.vision_tower.patch.weight"] = torch.zeros(1)
    model = build_model({"model_type": "gemma3", "text_config": text_cfg}, state)
    tokens = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(model.logits(prefill(model, tokens)[1]), hf_logits(hf, tokens), atol=TOL, rtol=0)


# -------------------------------------------------------------------------------------------- config

def test_transformers4_style_config_json_reads_like_the_5x_dict():
    """Older config.json files spell RoPE and layer kinds differently; both must give the same ModelConfig."""
    d = hf_model("gemma3").config.to_dict()
    new = model_config(d)
    old = {k: v for k, v in d.items() if k not in ("rope_parameters", "layer_types")}
    old |= {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "sliding_window_pattern": 2}
    assert model_config(old) == new
    assert new.sliding_layers == (True, False, True) and new.window(0) == WINDOW and new.window(1) is None
    assert new.rope == RopeConfig(1e6, RopeType.LINEAR, factor=2.0) and new.rope_local == RopeConfig(1e4)
    assert new.attn_scale == 24 ** -0.5 and new.embed_scale == 48 ** 0.5 and new.norm_unit_offset


def test_llama3_rope_scaling_from_rope_scaling_key():
    cfg = model_config({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
                               "max_position_embeddings": 64, "rope_scaling": {
                                   "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
    assert cfg.rope == RopeConfig(5e5, RopeType.LLAMA3, 8.0, 1.0, 4.0, original_max_position_embeddings=64)
    assert cfg.head_dim == 4 and cfg.num_kv_heads == 2 and not cfg.tie_word_embeddings


def test_qwen2_window_only_when_enabled():
    base = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 4, "num_attention_heads": 2, "sliding_window": 32768, "max_window_layers": 2}
    off = model_config({**base, "use_sliding_window": False})
    on = model_config({**base, "use_sliding_window": True})
    assert off.sliding_window is None and not any(off.sliding_layers) and off.qkv_bias and not off.o_bias
    assert on.sliding_layers == (False, False, True, True) and on.window(3) == 32768


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_size": None}, "missing required field"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "needs 'low_freq_factor'"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_act": "relu2"}, "unsupported activation"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_config_errors_are_clear(change, message):
    d = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 4, **change}
    with pytest.raises(ModelLoadError, match=message):
        model_config(d)


def test_gemma3_without_text_config_is_an_error():
    with pytest.raises(ModelLoadError, match="text_config"):
        model_config({"model_type": "gemma3"})


def test_every_family_is_registered_and_checked_against_transformers():
    cfg = model_config(hf_model("mistral").config.to_dict())
    assert cfg.model_type == "mistral" and all(cfg.sliding_layers) and cfg.head_dim == 16
    assert dataclasses.replace(cfg, sliding_window=None).window(0) is None
    from treespec.models.registry import family
    assert all(family(f.model_type) is f and family(w) is f for f in REGISTERED for w in f.wrappers)
    assert {f.model_type for f in REGISTERED} == set(HF_CLASSES)  # the oracle tests above cover each family


# ------------------------------------------------------------------------------------------ fast paths

@pytest.mark.parametrize("packed", [False, True], ids=["blas", "packed"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 64, 65, 300])
def test_linear_fast_path_equals_f_linear(rows, packed):
    torch.manual_seed(8)
    lin = Linear(24, 40, bias=True)
    assert lin.pack() if packed else lin.packed is None
    x = torch.randn(rows, 24)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=0)


def test_reloading_a_linear_drops_its_stale_packed_copy():
    from treespec.models.layers import set_linear
    lin = Linear(24, 40, bias=False)
    lin.weight = torch.nn.Parameter(torch.randn(40, 24), requires_grad=False)
    assert lin.pack()
    set_linear(lin, torch.randn(40, 24), None)
    assert lin.packed is None
    x = torch.randn(4, 24)
    torch.testing.assert_close(lin(x), x @ lin.weight.t(), atol=1e-5, rtol=0)


def test_rope_table_grows_on_demand():
    table = RotaryTable(RopeConfig(1e4), head_dim=8, capacity=4)
    pos = torch.tensor([0, 3, 9, 2])
    cos, sin = table.lookup(pos)
    angles = pos[:, None].float() * table.inv_freq
    assert table.cos.shape[0] >= 10
    torch.testing.assert_close(cos[:, 0], torch.cat([angles.cos()] * 2, dim=-1), atol=0, rtol=0)
    torch.testing.assert_close(sin[:, 0], torch.cat([-angles.sin(), angles.sin()], dim=-1), atol=0, rtol=0)


def test_apply_rope_is_hf_rotate_half():
    table = RotaryTable(RopeConfig(1e4), head_dim=8)
    pos = torch.tensor([0, 5, 17])
    x = torch.randn(3, 2, 8)
    angles = (pos[:, None].float() * table.inv_freq)[:, None]  # [T, 1, hd/2]
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    torch.testing.assert_close(apply_rope(x, *table.lookup(pos)), x * cos + rotate_half * sin)
