"""Tiny GGUF checkpoints written with `gguf.GGUFWriter`, converted from random HF tensors the way llama.cpp's
convert_hf_to_gguf.py does (renamed, Llama Q/K rows permuted, Gemma norms stored as 1 + w, quantized)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants

SP = "\u2581"
# HF leaf -> GGUF leaf, written out independently of treespec's own table
HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
LLAMA_LAYER = {**HF_TO_GGUF_LAYER, "post_attention_layernorm": "ffn_norm"}
GEMMA_LAYER = {**HF_TO_GGUF_LAYER, "pre_feedforward_layernorm": "ffn_norm",
               "post_attention_layernorm": "post_attention_norm", "post_feedforward_layernorm": "post_ffw_norm"}


@dataclass
class Dims:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 2
    ffn: int = 128


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (HF rotate-half -> interleaved), as in convert_hf_to_gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gemma_vocab() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocabulary: specials, 256 byte tokens, pieces (incl. Gemma's real-space tokens)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 4, 3, 3]
    pieces = [SP, "  ", "   ", "\n", "\n\n", *"abcdefghijklmnopqrstuvwxyz", "th", "he", "the", SP + "t", SP + "the",
              "in", "ing", SP + "w", "or", "ld", SP + "wor", SP + "world", "ll", "el", "hel", "hell", "hello",
              SP + "hello", "日本", "(", ")", ":", "x", "=", SP + "=", SP + SP + SP + "return"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types += [6] * 256 + [1] * len(pieces)
    scores = [-float(i) for i in range(len(tokens))]
    return tokens, scores, types


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """GPT-2 style vocabulary: the 256-symbol byte alphabet, a few merges, ChatML specials, <think>."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "in g", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld", "l l", "e l",
              "h el", "hel l", "hell o", "Ġ hello", "Ġ =", "Ċ Ċ", "Ġ Ġ", "ĠĠ ĠĠ"]
    merged = []
    for m in merges:
        a, b = m.split(" ")
        if a + b not in merged:
            merged.append(a + b)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
    tokens = alphabet + merged + specials
    types = [1] * (len(alphabet) + len(merged)) + [3, 3, 3, 4]
    return tokens, merges, types


def hf_tensors(arch: str, vocab: int, dims: Dims, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 parameters with transformers' names and shapes for `arch`."""
    rng = np.random.default_rng(seed)
    d = dims
    t: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((vocab, d.hidden)),
                                "model.norm.weight": rng.standard_normal(d.hidden)}
    if arch == "llama":
        t["lm_head.weight"] = rng.standard_normal((vocab, d.hidden))
    for i in range(d.layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rng.standard_normal((d.heads * d.head_dim, d.hidden))
        t[p + "self_attn.k_proj.weight"] = rng.standard_normal((d.kv_heads * d.head_dim, d.hidden))
        t[p + "self_attn.v_proj.weight"] = rng.standard_normal((d.kv_heads * d.head_dim, d.hidden))
        t[p + "self_attn.o_proj.weight"] = rng.standard_normal((d.hidden, d.heads * d.head_dim))
        t[p + "mlp.gate_proj.weight"] = rng.standard_normal((d.ffn, d.hidden))
        t[p + "mlp.up_proj.weight"] = rng.standard_normal((d.ffn, d.hidden))
        t[p + "mlp.down_proj.weight"] = rng.standard_normal((d.hidden, d.ffn))
        t[p + "input_layernorm.weight"] = rng.standard_normal(d.hidden)
        t[p + "post_attention_layernorm.weight"] = rng.standard_normal(d.hidden)
        if arch == "qwen2":
            for m, rows in (("q", d.heads), ("k", d.kv_heads), ("v", d.kv_heads)):
                t[p + f"self_attn.{m}_proj.bias"] = rng.standard_normal(rows * d.head_dim)
        if arch in ("qwen3", "gemma3"):
            t[p + "self_attn.q_norm.weight"] = rng.standard_normal(d.head_dim)
            t[p + "self_attn.k_norm.weight"] = rng.standard_normal(d.head_dim)
        if arch == "gemma3":
            t[p + "pre_feedforward_layernorm.weight"] = rng.standard_normal(d.hidden)
            t[p + "post_feedforward_layernorm.weight"] = rng.standard_normal(d.hidden)
    return {k: v.astype(np.float32) for k, v in t.items()}


def gguf_name(hf: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    leaves = GEMMA_LAYER if arch == "gemma3" else LLAMA_LAYER
    return f"blk.{layer}.{leaves[module]}.{kind}"


def to_gguf_tensor(hf: str, w: np.ndarray, arch: str, dims: Dims) -> np.ndarray:
    """The value llama.cpp's converter stores for HF tensor `hf` (before quantization)."""
    if arch == "llama" and ".q_proj." in hf:
        return llama_cpp_permute(w, dims.heads)
    if arch == "llama" and ".k_proj." in hf:
        return llama_cpp_permute(w, dims.kv_heads)
    if arch == "gemma3" and hf.endswith("norm.weight"):
        return w + 1.0
    return w


def write_model(path: Path, arch: str, dims: Dims = Dims(), qtypes: tuple[Q, ...] = (Q.Q8_0,),
                seed: int = 0, tokenizer: str = "llama", chat_template: str | None = None,
                extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny `arch` GGUF; 2-D weights cycle through `qtypes`, 1-D ones stay F32. Returns the HF tensors.

    extra_tensors: GGUF name -> float32 array, written as F32 after the model's own tensors.
    """
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(256)
    w.add_embedding_length(dims.hidden)
    w.add_block_count(dims.layers)
    w.add_feed_forward_length(dims.ffn)
    w.add_head_count(dims.heads)
    w.add_head_count_kv(dims.kv_heads)
    w.add_key_length(dims.head_dim)
    w.add_value_length(dims.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch != "gemma3" else 1e6)
    if arch == "gemma3":
        w.add_sliding_window(8)
    n_vocab = add_tokenizer(w, tokenizer, chat_template, space_prefix=arch != "gemma3")
    tensors = hf_tensors(arch, n_vocab, dims, seed)
    for i, (name, value) in enumerate(tensors.items()):
        stored = to_gguf_tensor(name, value, arch, dims)
        qtype = qtypes[i % len(qtypes)] if stored.ndim == 2 else Q.F32
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gguf_name(name, arch), stored.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(gguf_name(name, arch), quants.quantize(stored, qtype), raw_dtype=qtype)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def add_tokenizer(w: GGUFWriter, kind: str, chat_template: str | None, space_prefix: bool) -> int:
    if kind == "llama":
        tokens, scores, types = gemma_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(space_prefix)
    else:
        tokens, merges, types = byte_level_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types(types)
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_bos_token_id(tokens.index("<|endoftext|>"))
        w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    return len(tokens)
