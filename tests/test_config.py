"""Speculative/engine config parsing: vLLM-compatible forms, treespec's tree form, errors that name the field."""
import json

import pytest

from treespec.config import DrafterMethod, DraftRequests, DraftSampling, EngineConfig, SpecConfig
from treespec.errors import ConfigError


def test_vllm_ngram_form():
    s = SpecConfig.parse({"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5,
                          "num_speculative_tokens": 7})
    (d,) = s.drafters
    assert d.method is DrafterMethod.NGRAM and (d.prompt_lookup_min, d.prompt_lookup_max) == (2, 5)
    assert s.max_depth == 7 and s.budget is None and s.enabled


def test_vllm_draft_model_form_from_json():
    s = SpecConfig.parse('{"method": "draft_model", "model": "/m", "num_speculative_tokens": 3}')
    assert s.drafters[0].model == "/m" and s.max_depth == 3


def test_tree_form_with_several_drafters():
    s = SpecConfig.parse({"drafters": [{"method": "ngram"}, {"method": "draft_model", "model": "x",
                                                            "expansion": [1, 1, 3, 1]}],
                          "budget": 24, "draft_sampling": "without_replacement"})
    assert [d.method for d in s.drafters] == [DrafterMethod.NGRAM, DrafterMethod.DRAFT_MODEL]
    assert s.budget == 24 and s.draft_sampling is DraftSampling.WITHOUT_REPLACEMENT


@pytest.mark.parametrize("spec", [None, {}, {"method": "none"}])
def test_disabled(spec):
    assert not SpecConfig.parse(spec).enabled


@pytest.mark.parametrize("spec, field", [
    ({"method": "magic"}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": "5"}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"method": "draft_model"}, "model"),
    ({"method": "ngram", "bogus": 1}, "bogus"),
    ({"method": "ngram", "budget": 0}, "budget"),
    ({"drafters": [{"method": "ngram"}], "draft_sampling": "random"}, "draft_sampling"),
    ({"drafters": "ngram"}, "drafters"),
    ({"method": "draft_model", "model": "m", "expansion": [1, 0]}, "expansion"),
    ("{not json", "speculative_config"),
])
def test_errors_name_the_field(spec, field):
    with pytest.raises(ConfigError, match=field):
        SpecConfig.parse(spec)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"max_model_len": 1}, "max_model_len"),
    ({"weight_quantization": "int3"}, "weight_quantization"), ({"model": ""}, "model"),
])
def test_engine_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(**kwargs)


def test_auto_picks_available_drafters_and_takes_no_fields(monkeypatch, tmp_path):
    from treespec.drafters import registry
    s = SpecConfig.parse({"method": "auto"})
    assert s.auto and [d.method for d in s.drafters] == [DrafterMethod.NGRAM]
    assert registry.resolve_auto(s, tmp_path / "model.gguf").drafters == s.drafters  # nothing shipped for it
    head = tmp_path / "head"
    head.mkdir()
    monkeypatch.setattr(registry, "shipped_drafters", lambda source: [head])
    assert registry.resolve_auto(s, tmp_path / "model.gguf").drafters == s.drafters  # no auto.json: not used
    (head / "auto.json").write_text('{"use_in_auto": true, "drafter": {"num_speculative_tokens": 3}}')
    resolved = registry.resolve_auto(s, tmp_path / "model.gguf")
    assert not resolved.auto
    assert [(d.method, d.model) for d in resolved.drafters] == [(DrafterMethod.LEARNED, str(head)),
                                                               (DrafterMethod.NGRAM, None)]
    assert resolved.drafters[0].num_speculative_tokens == 3
    with pytest.raises(ConfigError, match="auto"):
        SpecConfig.parse({"method": "auto", "num_speculative_tokens": 3})


def test_auto_gives_sampling_requests_the_shipped_sampling_drafter(monkeypatch, tmp_path):
    from treespec.drafters import registry
    monkeypatch.setattr(registry, "shipped_drafters", lambda source: [tmp_path])
    (tmp_path / "auto.json").write_text(json.dumps({"use_in_auto": False, "sampling": {"drafter": {
        "method": "layer_skip", "quantization": "fp16", "draft_vocab_size": 64, "draft_vocab_counts": "counts.json"}}}))
    resolved = registry.resolve_auto(SpecConfig.parse({"method": "auto"}), tmp_path / "model.gguf")
    assert [(d.method, d.requests) for d in resolved.drafters] == [(DrafterMethod.NGRAM, DraftRequests.GREEDY),
                                                                   (DrafterMethod.LAYER_SKIP, DraftRequests.SAMPLING)]
    assert resolved.drafters[1].draft_vocab_counts == str(tmp_path / "counts.json")
    assert resolved.draft_sampling is DraftSampling.COUPLED
    with pytest.raises(ConfigError, match="requests"):
        SpecConfig.parse({"method": "ngram", "requests": "sometimes"})


def test_spec_config_from_a_json_file(tmp_path):
    f = tmp_path / "speculative.json"
    f.write_text('{"drafters": [{"method": "ngram", "num_speculative_tokens": 3}]}')
    assert SpecConfig.parse(str(f)).drafters[0].num_speculative_tokens == 3
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="speculative_config"):
        SpecConfig.parse(str(f))
