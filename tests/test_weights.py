"""Safetensors directories (single and sharded), header validation, model resolution, refused pickles."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_gguf import write_model
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from treespec.errors import ModelLoadError
from treespec.weights.loader import load_checkpoint, resolve_model
from treespec.weights.safetensors import read_header

CONFIG = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
          "num_attention_heads": 1, "intermediate_size": 8, "eos_token_id": [2, 3]}


def tiny_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.randn(4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
    }


def write_tokenizer(directory: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3, "hello": 4, "world": 5}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<eot>"])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True}))


def hf_dir(root: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None) -> Path:
    d = root / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config or CONFIG))
    write_tokenizer(d)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("shards", [1, 2])
def test_safetensors_dir_loads_as_fp32(tmp_path: Path, shards: int) -> None:
    tensors = tiny_tensors()
    ckpt = load_checkpoint(str(hf_dir(tmp_path, tensors, shards)))
    assert set(ckpt.tensors) == set(tensors)
    for name, want in tensors.items():
        assert ckpt.tensors[name].dtype == torch.float32
        assert torch.equal(ckpt.tensors[name], want.float()), name
    assert ckpt.quant_types == {"BF16": 2, "F16": 1, "F32": 1}
    assert ckpt.config == CONFIG
    tok = ckpt.tokenizer
    assert tok.encode("hello world") == [1, 4, 5] and tok.bos_id == 1
    assert tok.eos_ids == {2, 3} and tok.decode([1, 4, 5]) == "hello world"


def test_multimodal_gemma3_keeps_the_text_model(tmp_path: Path) -> None:
    names = ["language_model.model.norm.weight", "vision_tower.x.weight", "multi_modal_projector.w",
             "model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    tensors = {n: torch.ones(2, 2) for n in names}
    ckpt = load_checkpoint(str(hf_dir(tmp_path, tensors, config={"model_type": "gemma3", "text_config": {}})))
    assert set(ckpt.tensors) == {"model.norm.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"}


# ---- header validation --------------------------------------------------------------------------------------

def _file_with_header(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"a": _entry("F32", [2], 0, 8), "b": _entry("BF16", [2, 2], 8, 16), "__metadata__": {"format": "pt"}}


@pytest.mark.parametrize("header, data_len, message", [
    ({"a": _entry("F31", [2], 0, 8)}, 8, "unknown dtype 'F31'"),
    ({"a": _entry("F32", [3], 0, 8)}, 8, "do not hold shape"),
    ({"a": _entry("F32", [-2], 0, 8)}, 8, "non-negative"),
    ({"a": _entry("F32", [2], 8, 0)}, 8, "data_offsets"),
    ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, 12, "overlaps"),
    ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 12, 20)}, 20, "gap"),
    ({"a": _entry("F32", [2], 0, 8)}, 4, "truncated"),
    ({"a": _entry("F32", [2], 0, 8)}, 12, "trailing bytes"),
    ({"a": [1, 2]}, 8, "not an object"),
])
def test_bad_safetensors_header(tmp_path: Path, header: dict, data_len: int, message: str) -> None:
    path = _file_with_header(tmp_path / "m.safetensors", header, bytes(data_len))
    with pytest.raises(ModelLoadError, match=message):
        read_header(path)


def test_good_header_is_accepted(tmp_path: Path) -> None:
    entries = read_header(_file_with_header(tmp_path / "m.safetensors", GOOD, bytes(16)))
    assert [(e.name, e.dtype, e.shape) for e in entries] == [("a", "F32", (2,)), ("b", "BF16", (2, 2))]


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x02", "header length"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (struct.pack("<Q", 0), "header length"),
    (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_bad_safetensors_prefix(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ModelLoadError, match=message):
        read_header(path)


def test_truncated_safetensors_checkpoint(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, tiny_tensors())
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_checkpoint(str(d))


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, tiny_tensors(), shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing: model-00002-of-00002"):
        load_checkpoint(str(d))


def point_shard_at(d: Path, target: str) -> None:
    """Rewrite the index so the second shard's tensors live at `target` (relative to the model directory)."""
    index = d / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map = {n: f if f == "model-00001-of-00002.safetensors" else target for n, f in weight_map.items()}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_entry_leading_out_of_the_directory_refused(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, tiny_tensors(), shards=2)
    (d / "model-00002-of-00002.safetensors").rename(tmp_path / "outside.safetensors")
    point_shard_at(d, "../outside.safetensors")
    with pytest.raises(ModelLoadError, match=r"'\.\./outside\.safetensors' points outside the model directory"):
        load_checkpoint(str(d))
    point_shard_at(d, str(tmp_path / "outside.safetensors"))  # an absolute path too
    with pytest.raises(ModelLoadError, match="points outside the model directory"):
        load_checkpoint(str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": 7}}))
    with pytest.raises(ModelLoadError, match="entry 7 is not a file name"):
        load_checkpoint(str(d))


def test_index_entry_symlinked_out_of_the_directory_refused(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, tiny_tensors(), shards=2)
    (d / "model-00002-of-00002.safetensors").rename(tmp_path / "outside.safetensors")
    (d / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(ModelLoadError, match="'model-00002-of-00002.safetensors' points outside the model dir"):
        load_checkpoint(str(d))
    (d / "model-00002-of-00002.safetensors").unlink()
    (d / "model-00002-of-00002.safetensors").symlink_to(d / "model-00002-of-00002.safetensors")
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):  # a loop: refused, named
        load_checkpoint(str(d))


def test_hf_cache_snapshot_links_into_its_blobs(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot's files are symlinks to ../../blobs: still inside the repo folder, so loaded."""
    tensors = tiny_tensors()
    repo = tmp_path / "models--org--tiny"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "blobs").mkdir()
    d = hf_dir(tmp_path, tensors, shards=2).rename(repo / "snapshots" / "abc123")
    for shard in sorted(d.glob("model-*.safetensors")):
        shard.rename(repo / "blobs" / shard.name)
        shard.symlink_to(Path("../../blobs") / shard.name)
    assert set(load_checkpoint(str(d)).tensors) == set(tensors)


def test_prequantized_checkpoint_refused(tmp_path: Path) -> None:
    d = hf_dir(tmp_path, tiny_tensors(), config={**CONFIG, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ModelLoadError, match="gptq"):
        load_checkpoint(str(d))


# ---- resolving names and refusing pickles -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_file_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelLoadError, match="pickle checkpoints .* refused"):
        load_checkpoint(str(tmp_path / name))


def test_directory_with_only_pickles_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelLoadError, match="refused because loading them can run arbitrary code"):
        load_checkpoint(str(tmp_path))


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found.*gemma-3-270m"):
        resolve_model(str(tmp_path / "nope"))


def test_other_file_types_refused(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="expected a .gguf file"):
        resolve_model(str(tmp_path / "model.onnx"))


def test_directory_holding_one_gguf_resolves_to_it(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", "llama")
    assert resolve_model(str(tmp_path)) == tmp_path / "m.gguf"
    write_model(tmp_path / "n.gguf", "llama")
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        resolve_model(str(tmp_path))


@pytest.mark.slow
def test_default_alias_resolves_to_the_assembled_gguf() -> None:
    path = resolve_model("gemma-3-270m")
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size == 253_113_024
