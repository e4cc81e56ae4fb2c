"""GGUF loading: dequantization, header parsing, llama.cpp's conversions undone, config, corrupt files."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from gguf import GGMLQuantizationType as Q
from tiny_gguf import Dims, llama_cpp_permute, write_model

from treespec.errors import ModelLoadError
from treespec.weights import dequant
from treespec.weights.dequant import dequantize, supported
from treespec.weights.gguf import unpermute_qk
from treespec.weights.gguf_config import llama3_factors
from treespec.weights.gguf_file import read_gguf
from treespec.weights.loader import load_checkpoint

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
# every block format the gguf package can decode: our output must equal its reference
GGUF_DECODABLE = [t for t in Q if isinstance(getattr(quants, t.name, None), type)]
MIXED = (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q4_1, Q.F16, Q.BF16)


def tokenizer_kind(arch: str) -> str:
    return "gpt2" if arch.startswith("qwen") else "llama"


def random_tensor_bytes(qtype: Q, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """[rows, row_bytes] uint8 of random blocks (random fp16 scales included, so some values are inf/nan)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    return np.random.default_rng(seed).integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random scales include inf/nan
@pytest.mark.parametrize("qtype", GGUF_DECODABLE + [Q.F16, Q.F32], ids=lambda q: q.name)
def test_dequantize_equals_gguf_reference(qtype: Q) -> None:
    block, _ = GGML_QUANT_SIZES[qtype]
    raw = random_tensor_bytes(qtype, rows=3, blocks_per_row=2)
    expect = quants.dequantize(raw, qtype)
    got = dequantize(raw.reshape(-1), qtype, (3, 2 * block))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expect)  # NaNs compare equal position by position


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dequantize_across_chunk_boundaries() -> None:
    step = dequant._CHUNK_VALUES // 32
    raw = random_tensor_bytes(Q.Q8_0, rows=1, blocks_per_row=2 * step + 7, seed=1)
    got = dequantize(raw.reshape(-1), Q.Q8_0, (1, (2 * step + 7) * 32))
    np.testing.assert_array_equal(got, quants.dequantize(raw, Q.Q8_0))


def _blockwise_q8(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """Slow twin for the two formats gguf cannot decode: one block at a time, value = d * q."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    out = []
    for blk in raw.reshape(-1, type_size):
        d = np.frombuffer(blk[:4].tobytes(), "<f4")[0]
        q = blk[8:40] if qtype == Q.Q8_1 else blk[4:260]
        out.append(np.float32(d) * q.view(np.int8).astype(np.float32))
    return np.concatenate(out)


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.Q8_K], ids=lambda q: q.name)
def test_dequantize_q8_1_and_q8_k_match_blockwise_twin(qtype: Q) -> None:
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = random_tensor_bytes(qtype, rows=2, blocks_per_row=3, seed=2)
    scales = np.random.default_rng(3).uniform(-2, 2, 6).astype("<f4")
    raw.reshape(-1, type_size)[:, :4] = scales.view(np.uint8).reshape(6, 4)  # finite scales
    got = dequantize(raw.reshape(-1), qtype, (2, 3 * block))
    np.testing.assert_array_equal(got.reshape(-1), _blockwise_q8(raw, qtype))
    assert np.isfinite(got).all() and got.any()


def test_unsupported_type_is_a_model_load_error() -> None:
    unsupported = [t for t in Q if not supported(t)]
    assert unsupported, "every GGML type decodes now; drop this test"
    block, type_size = GGML_QUANT_SIZES[unsupported[0]]
    with pytest.raises(ModelLoadError, match="cannot be dequantized"):
        dequantize(np.zeros(type_size, np.uint8), unsupported[0], (block,))


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.random.default_rng(0).standard_normal((4 * 16, 24)).astype(np.float32)
    b = w[:, 0].copy()
    assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(w, 4)), 4), torch.from_numpy(w))
    assert torch.equal(unpermute_qk(torch.from_numpy(llama_cpp_permute(b, 4)), 4), torch.from_numpy(b))
    assert not np.array_equal(llama_cpp_permute(w, 4), w)


def test_parser_agrees_with_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, "gemma3", qtypes=MIXED, chat_template="{{ messages }}")
    mine, ref = read_gguf(path), GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want, got = field.contents(), mine.metadata[key]
        if isinstance(want, float):
            assert got == float(str(np.float32(want))), key
        else:
            assert np.array_equal(np.asarray(got), np.asarray(want)), key
    assert [t.name for t in mine.tensors] == [t.name for t in ref.tensors]
    for m, r in zip(mine.tensors, ref.tensors):
        assert m.qtype == r.tensor_type and m.shape == tuple(reversed(r.shape.tolist()))
        assert np.array_equal(mine.raw(m), r.data.view(np.uint8).reshape(-1)), m.name


@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_model_round_trips_to_hf_tensors(arch: str, tmp_path: Path) -> None:
    """F32 storage: Q/K unpermute and the Gemma norm offset must give back the HF tensors."""
    path = tmp_path / "m.gguf"
    hf = write_model(path, arch, qtypes=(Q.F32,), tokenizer=tokenizer_kind(arch))
    ckpt = load_checkpoint(str(path))
    assert set(ckpt.tensors) == set(hf)
    for name, want in hf.items():
        got = ckpt.tensors[name]
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape, name
        torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=3e-7, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_model_equals_transformers_gguf_loader(arch: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    path = tmp_path / "m.gguf"
    write_model(path, arch, qtypes=MIXED, tokenizer=tokenizer_kind(arch))
    ckpt = load_checkpoint(str(path))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ckpt.config))  # our config is HF-valid
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(ref) == set(ckpt.tensors)
    for name, got in ckpt.tensors.items():
        assert torch.equal(got, torch.as_tensor(ref[name]).float()), name
    assert ckpt.quant_types == {"F32": sum(t.ndim == 1 for t in ckpt.tensors.values()),
                                **_count_2d(ckpt.tensors, MIXED)}


def _count_2d(tensors: dict, qtypes: tuple[Q, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i, t in enumerate(tensors.values()):  # write_model cycles qtypes over all tensors, 1-D ones stay F32
        if t.ndim == 2:
            counts[qtypes[i % len(qtypes)].name] = counts.get(qtypes[i % len(qtypes)].name, 0) + 1
    return counts


def test_gemma3_config_has_family_defaults(tmp_path: Path) -> None:
    from transformers import AutoConfig
    path = tmp_path / "m.gguf"
    write_model(path, "gemma3", dims=Dims(layers=7))
    cfg = load_checkpoint(str(path)).config
    assert cfg["model_type"] == "gemma3_text" and cfg["tie_word_embeddings"] is True
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert cfg["query_pre_attn_scalar"] == cfg["head_dim"] == 16
    assert (cfg["sliding_window"], cfg["rope_local_base_freq"], cfg["rope_theta"]) == (8, 10_000.0, 1e6)
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and cfg["rms_norm_eps"] == 1e-6
    assert cfg["final_logit_softcapping"] is None and cfg["rope_scaling"] is None
    hf = AutoConfig.for_model(**cfg)
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert hf.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert hf.layer_types == cfg["layer_types"]


def test_llama_config_and_untied_head(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, "llama")
    ckpt = load_checkpoint(str(path))
    cfg = ckpt.config
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is False and "lm_head.weight" in ckpt.tensors
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["vocab_size"] == ckpt.tensors["model.embed_tokens.weight"].shape[0]
    assert cfg["rope_scaling"] is None and cfg["hidden_act"] == "silu"


def _hf_llama3_factors(theta: float, head_dim: int, rope: dict) -> np.ndarray:
    """transformers' own llama3 RoPE: factor = default inverse frequency / scaled inverse frequency."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                      rope_scaling={"rope_type": "llama3", **rope})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (plain / scaled).numpy()


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = _hf_llama3_factors(10_000.0, 16, rope)
    assert len(set(np.round(factors, 4))) > 2  # short, smoothed and long wavelengths all occur
    np.testing.assert_allclose(llama3_factors(10_000.0, 16, **rope), factors, rtol=1e-5)
    path = tmp_path / "m.gguf"
    write_model(path, "llama", extra_tensors={"rope_freqs.weight": factors})
    ckpt = load_checkpoint(str(path))
    assert ckpt.config["rope_scaling"] == {"rope_type": "llama3", **rope}
    assert "rope_freqs.weight" not in ckpt.tensors and not any("rope" in k for k in ckpt.tensors)
    write_model(path, "llama", extra_tensors={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load_checkpoint(str(path))


# ---- corrupt and unsupported files --------------------------------------------------------------------------

@pytest.fixture
def gguf_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "ok.gguf"
    write_model(path, "llama")
    return path.read_bytes()


def _load_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    load_checkpoint(str(path))


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.3, 0.9, 0.99999])
def test_truncated_gguf(gguf_bytes: bytes, tmp_path: Path, fraction: float) -> None:
    cut = gguf_bytes[: max(24, int(len(gguf_bytes) * fraction))]
    with pytest.raises(ModelLoadError, match="truncated"):
        _load_bytes(tmp_path, cut)


@pytest.mark.parametrize("data, message", [
    (b"GGUF\x03\x00", "too small"),
    (b"GGML" + bytes(60), "not a GGUF file"),
    (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "GGUF version 1"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0), "implausible count"),
])
def test_bad_gguf_header(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        _load_bytes(tmp_path, data)


def test_unknown_tensor_type_id(gguf_bytes: bytes, tmp_path: Path) -> None:
    name = b"output_norm.weight"
    at = gguf_bytes.index(name) + len(name)
    n_dims = struct.unpack_from("<I", gguf_bytes, at)[0]
    type_at = at + 4 + 8 * n_dims
    data = gguf_bytes[:type_at] + struct.pack("<I", 99) + gguf_bytes[type_at + 4:]
    with pytest.raises(ModelLoadError, match="unknown GGMLQuantizationType 99"):
        _load_bytes(tmp_path, data)


def test_every_gguf_layout_is_round_tripped() -> None:
    from treespec.models import FAMILIES
    assert {f.gguf.arch for f in FAMILIES if f.gguf is not None} == set(ARCHS)


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, "phi3")
    with pytest.raises(ModelLoadError, match="architecture 'phi3' is not supported"):
        load_checkpoint(str(path))


def test_unknown_tensor_name(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, "llama", extra_tensors={"blk.0.mystery.weight": np.zeros(4, np.float32)})
    with pytest.raises(ModelLoadError, match="blk.0.mystery.weight"):
        load_checkpoint(str(path))


def test_progress_bar_does_not_change_result(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, "qwen3", tokenizer="gpt2")
    a, b = load_checkpoint(str(path)), load_checkpoint(str(path), progress=True)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.slow
def test_default_model_loads() -> None:
    ckpt = load_checkpoint("gemma-3-270m")
    cfg = ckpt.config
    assert cfg["model_type"] == "gemma3_text" and cfg["vocab_size"] == 262144 and len(ckpt.tensors) == 236
    assert ckpt.quant_types == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"], cfg["query_pre_attn_scalar"]) == \
        (640, 18, 256, 256)
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["layer_types"][5] == "full_attention"
    assert tuple(ckpt.tensors["model.embed_tokens.weight"].shape) == (262144, 640)
    assert tuple(ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].shape) == (1024, 640)
    gguf = read_gguf(ckpt.source)  # llama.cpp stored Gemma's norms as 1 + w
    info = next(t for t in gguf.tensors if t.name == "blk.0.attn_q_norm.weight")
    stored = torch.from_numpy(dequantize(gguf.raw(info), info.qtype, info.shape))
    assert torch.equal(ckpt.tensors["model.layers.0.self_attn.q_norm.weight"], stored - 1)
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in ckpt.tensors.values())
