"""HF directory round trip: transformers' save_pretrained (safetensors) -> treespec's loader -> logits equal HF."""
import pytest
import torch
from serving_tiny import tiny_backend
from tiny_hf import FAMILIES, hf_logits, hf_model

from treespec.attention.metadata import single
from treespec.models.registry import build_model
from treespec.weights.loader import load_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_with_equal_logits(family, tmp_path):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tiny_backend().save(str(tmp_path / "tokenizer.json"))
    ckpt = load_checkpoint(str(tmp_path))
    model = build_model(ckpt.config, ckpt.tensors)
    tokens = torch.randint(0, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(64)
    cache.reserve(12)
    with torch.inference_mode():
        ours = model.logits(model(tokens, torch.arange(12), single(cache, 12)))
    torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)
