"""Benchmark harness: Spec-Bench loading, the side-by-side runner, summary maths and report files."""
import json

import pytest
from serving_tiny import save_tiny_model_dir

from treespec import LLM, SamplingParams
from treespec.bench.dataset import CATEGORY_ORDER, load_prompts
from treespec.bench.report import markdown_table, write_outputs
from treespec.bench.spec_bench import RunRecord, run_methods, summarize
from treespec.errors import ConfigError


def test_shipped_spec_bench_has_six_categories_of_80():
    prompts = load_prompts()
    cats = {}
    for p in prompts:
        cats[p.category] = cats.get(p.category, 0) + 1
    assert cats == {c: 80 for c in CATEGORY_ORDER}
    assert {p.category for p in load_prompts(limit=3)} == set(CATEGORY_ORDER) and len(load_prompts(limit=3)) == 18


def test_custom_jsonl_and_bad_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "hello"}) + "\n\n" + json.dumps({"turns": ["a", "b"], "category": "x"}) + "\n")
    assert [(p.category, p.text) for p in load_prompts(f)] == [("default", "hello"), ("x", "a")]
    f.write_text("{not json\n")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_prompts(f)
    f.write_text(json.dumps({"text": "no prompt field"}) + "\n")
    with pytest.raises(ConfigError, match="turns"):
        load_prompts(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_prompts(tmp_path / "missing.jsonl")


def _rec(method, cat, tokens, secs, steps, accepted, equal=None):
    return RunRecord(method, "q", cat, tokens, secs, secs, steps, accepted, equal, [])


def test_summary_speedup_is_total_tokens_over_total_time():
    recs = [_rec("plain", "a", 100, 10.0, 100, 0), _rec("plain", "b", 100, 10.0, 100, 0),
            _rec("ngram", "a", 100, 2.0, 25, 75, True), _rec("ngram", "b", 100, 8.0, 80, 20, False)]
    s = summarize(recs)
    assert s["ngram"]["a"]["speedup"] == 5.0 and s["ngram"]["overall"]["speedup"] == 2.0
    assert s["ngram"]["overall"]["tokens_per_step"] == round(1 + 95 / 105, 3)
    assert s["ngram"]["overall"]["equal"] == 1
    assert "| ngram | **overall** | 2 | 20.0 | 2.00x |" in markdown_table(s)


def test_run_methods_and_reports_on_a_tiny_model(tmp_path):
    llm = LLM(str(save_tiny_model_dir(tmp_path / "m")), speculative_config=None)
    prompts = load_prompts(limit=1)[:2]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    recs = run_methods(llm, {"plain": None, "ngram": {"method": "ngram", "budget": 4}}, prompts, params,
                       chat=False, progress=False)
    assert [r.method for r in recs] == ["plain", "ngram"] * 2
    assert all(r.equal_to_plain for r in recs if r.method == "ngram")
    paths = write_outputs(tmp_path / "out", {"records": [r.as_dict() for r in recs]}, summarize(recs), "t")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
